#!/usr/bin/env bash
# The test suite: create .venv if missing, bring up the two test nodes and the two-node Slurm and Ray test clusters
# on them (needs root on Debian; idempotent, a few seconds when they are already up), then run pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the fast tests only.
# Two pytest workers share the suite (pytest-xdist).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/env.sh"
bash "$ROOT/scripts/test-nodes.sh"
bash "$ROOT/scripts/slurm-up.sh"
bash "$ROOT/scripts/ray-up.sh"
cd "$ROOT"
# Both cores: many tests wait on their subprocesses (torchrun, Slurm, Ray); tests that share a cluster or a
# costly fixture are kept on one worker by their xdist_group. FILIPCTL_TEST_WORKERS=0 runs them in this process.
exec "$ROOT/.venv/bin/python" -m pytest -n "${FILIPCTL_TEST_WORKERS:-2}" --dist loadgroup --durations=15 "$@"
