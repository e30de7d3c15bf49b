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

# env.sh itself is in the stamp: a change to how the environment is built rebuilds existing ones.
stamp="$(cat "$ROOT/constraints.txt" "$ROOT/pyproject.toml" "$ROOT/scripts/env.sh" "$ROOT/models/csrc/"*.cpp \
  | sha256sum | cut -c1-16)"
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
# deepspeed ships as an sdist: build it against the torch above, without its fused CUDA ops, but with the CPU
# shared-memory collective op prebuilt into site-packages. Otherwise every CPU worker JIT-compiles it at start
# into ~/.cache/torch_extensions (40 s to 5 minutes with a cold cache; fails with a read-only HOME).
# DS_ACCELERATOR=cpu: the op is only used by CPU workers, and deepspeed loads a prebuilt op only for the
# accelerator it was built for. Uninstall first and --no-cache-dir: a deepspeed already installed, or a wheel pip
# cached from an earlier build without the op, would otherwise be reused as is.
"$VENV/bin/python" -m pip uninstall -y -q deepspeed >>"$LOG" 2>&1 || true
DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 pip_install --no-build-isolation --no-cache-dir deepspeed
if ! DS_ACCELERATOR=cpu "$VENV/bin/python" -c "import deepspeed.ops.comm.deepspeed_shm_comm_op" >>"$LOG" 2>&1; then
  tail -30 "$LOG" >&2
  echo "==> deepspeed was built without its CPU shm op (needs g++ and the Python headers); full log: $LOG" >&2
  exit 1
fi
pip_install --no-build-isolation -e "$ROOT[dev]"
# The C++ backward of the CPU late interaction (models/cpu_ops.py loads it; without it the torch path runs, ~3x
# slower). Built once here, not at a worker's start. x86-64-v3 (AVX2): the venv may run on other x86 nodes than
# this one; a wider target only where it is built is what -march=native would risk.
arch_flags=""
[ "$(uname -m)" = "x86_64" ] && arch_flags="-march=x86-64-v3"
echo "==> building the C++ late-interaction backward (about 10 s)" >&2
rm -rf "$VENV/filipctl_ops"
if ! "$VENV/bin/python" - "$ROOT/models/csrc" "$VENV/filipctl_ops" $arch_flags >>"$LOG" 2>&1 <<'PY'
import os, sys
from pathlib import Path
from torch.utils.cpp_extension import load
os.makedirs(sys.argv[2])
load(name="filip_cpu_ops", sources=sorted(str(p) for p in Path(sys.argv[1]).glob("*.cpp")), build_directory=sys.argv[2],
     extra_cflags=["-O3", *sys.argv[3:]], is_python_module=False)
PY
then
  tail -20 "$LOG" >&2
  echo "==> the C++ late-interaction backward did not build (needs g++); the torch path runs instead. Log: $LOG" >&2
fi
echo "$stamp" > "$VENV/.filipctl-env"
echo "==> environment ready: $VENV" >&2
