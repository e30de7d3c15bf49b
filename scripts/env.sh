#!/usr/bin/env bash
# Create the project environment in .venv at the repo root when it is missing or stale.
# Every package version comes from constraints.txt (the lock); torch is pinned there so
# nothing can pull a multi-GB CUDA build of a newer release.
#   bash scripts/env.sh            create/refresh .venv
#   bash scripts/env.sh --relock   rewrite constraints.txt from the current .venv
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

if [ "${1:-}" = "--relock" ]; then
  { echo "# The lock: exact versions of every package in .venv (pip freeze on Python 3.11, x86_64)."
    echo "# scripts/env.sh installs with -c constraints.txt; regenerate with scripts/env.sh --relock."
    "$VENV/bin/pip" freeze --exclude-editable | grep -v -E '^filipctl'; } > "$ROOT/constraints.txt"
  echo "constraints.txt rewritten"; exit 0
fi

stamp="$(cat "$ROOT/constraints.txt" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ -f "$VENV/.filipctl-env" ] && [ "$(cat "$VENV/.filipctl-env")" = "$stamp" ]; then
  exit 0
fi

echo "==> creating $VENV (about 5 minutes the first time)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
LOG="$VENV/install.log"
: > "$LOG"
pip_install() {  # pip's chatter goes to the log; its tail is shown only when it fails
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -q -c "$ROOT/constraints.txt" "$@" >>"$LOG" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$LOG" | tail -30 >&2
    echo "==> pip install $* failed; full log: $LOG" >&2
    exit 1
  fi
}
pip_install torch torchvision setuptools wheel
# deepspeed ships as an sdist: build it against the torch above, without its fused CUDA ops.
DS_BUILD_OPS=0 pip_install --no-build-isolation deepspeed
pip_install --no-build-isolation -e "$ROOT[dev]"
echo "$stamp" > "$VENV/.filipctl-env"
echo "==> environment ready: $VENV" >&2
