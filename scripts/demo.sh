#!/usr/bin/env bash
# The demo: create .venv if missing, then pretrain and evaluate the smoke recipe locally.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/filipctl" run recipes/smoke.yaml "$@"
