#!/usr/bin/env bash
# The test suite: create .venv if missing, bring up the single-node Slurm test cluster
# (needs root on Debian; idempotent, ~0.5 s when it is already up), then run pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the fast tests only.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/env.sh"
bash "$ROOT/scripts/slurm-up.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
