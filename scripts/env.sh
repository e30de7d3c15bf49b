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

# -- progress: step k of n, what pip is on, the time left ------------------------------------------------------
# Seconds each step took on a 2-core machine with an empty pip cache (about 5 minutes in all). The time left is
# these, scaled by how fast the finished steps went here (a warm cache or a faster machine shortens it).
STEP_NAMES=("virtual environment" "torch, torchvision" "deepspeed (built from source, with its CPU shm op)"
            "filipctl and its dependencies (mlflow, ray, transformers, ...)" "C++ late-interaction ops")
STEP_SECONDS=(5 70 80 130 15)
STEP=0; STEP_START=$SECONDS; DONE_EST=0; DONE_TOOK=0
PINNED=$(grep -c -E '^[A-Za-z0-9]' "$ROOT/constraints.txt" || true)
[ -t 2 ] && TTY=1 || TTY=0
fmt_s() { if [ "$1" -ge 60 ]; then printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); else printf '%ds' "$1"; fi; }
time_left() {  # the rest of this step and the steps after it, at the pace measured so far
  local i rest=0 pace=100 cur
  [ "$DONE_EST" -gt 0 ] && pace=$((DONE_TOOK * 100 / DONE_EST))
  [ "$pace" -lt 30 ] && pace=30
  for ((i = STEP; i < ${#STEP_SECONDS[@]}; i++)); do rest=$((rest + STEP_SECONDS[i] * pace / 100)); done
  if [ "$STEP" -gt 0 ]; then  # a step running longer than expected: at least a second more, not a negative time
    cur=$((STEP_SECONDS[STEP - 1] * pace / 100 - (SECONDS - STEP_START)))
    rest=$((rest + (cur > 1 ? cur : 1)))
  fi
  fmt_s "$rest"
}
step() {  # the next step: close the one before (its measured time sets the pace), announce this one
  if [ "$STEP" -gt 0 ] && [ "${STEP_SECONDS[STEP - 1]}" -ge 30 ]; then  # the short steps say little about the pace
    DONE_EST=$((DONE_EST + STEP_SECONDS[STEP - 1])); DONE_TOOK=$((DONE_TOOK + SECONDS - STEP_START))
  fi
  STEP=$((STEP + 1)); STEP_START=$SECONDS; STEP_LOG_FROM=$(wc -l < "${LOG:-/dev/null}" 2>/dev/null || echo 0)
  echo "==> [$STEP/${#STEP_NAMES[@]}] ${STEP_NAMES[STEP - 1]} (about $(time_left) left)" >&2
}
pip_status() {  # what pip is doing now, from its output since this step began
  local new resolved last
  new=$(tail -n +"$((STEP_LOG_FROM + 1))" "$LOG")
  resolved=$(grep -c -E '^(Collecting|Processing|Requirement already satisfied:) ' <<<"$new" || true)
  last=$(grep -E '^(Collecting|Processing|Requirement already satisfied:|Building wheel for|Installing collected '\
'packages:|  Downloading) ' <<<"$new" | tail -n 1 || true)
  case "$last" in
    "Installing collected packages:"*) last="installing $(($(tr -cd ',' <<<"$last" | wc -c) + 1)) packages";;
    "Building wheel for"*) last="building $(awk '{print $4}' <<<"$last")";;
    "Processing"*) last="resolving $(sed -E 's#^Processing ([^ ]*/)?([^/ -]+).*#\2#' <<<"$last")";;
    "  Downloading"*) last="downloading $(awk '{print $2}' <<<"$last" | cut -d- -f1) $(grep -o '([^)]*)' <<<"$last")";;
    *) last="resolving $(sed -E 's/^(Collecting|Requirement already satisfied:) ([^ <>=!~;(\[]+).*/\2/' <<<"$last")";;
  esac
  [ "$last" = "resolving " ] && last="pip starting"
  [ "$resolved" -gt 0 ] && last="$resolved${EXPECT:+ of ~$EXPECT} packages resolved; $last"
  printf '%s' "$last"
}
watch_step() {  # run "$@" with its output in the log; meanwhile a status line: on a terminal in place, else every 15 s
  "$@" >>"$LOG" 2>&1 &
  local pid=$! tick=0 line rc
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1; tick=$((tick + 1))
    line="    [$STEP/${#STEP_NAMES[@]}] $(fmt_s $((SECONDS - STEP_START))): $(pip_status) -- about $(time_left) left"
    if [ "$TTY" = 1 ]; then printf '\r\033[K%s' "${line:0:$(( ${COLUMNS:-120} - 1 ))}" >&2
    elif [ $((tick % 15)) = 0 ]; then echo "$line" >&2; fi
  done
  [ "$TTY" = 1 ] && printf '\r\033[K' >&2
  wait "$pid" && rc=0 || rc=$?
  return "$rc"
}

echo "==> creating $VENV: ${#STEP_NAMES[@]} steps, about $(time_left) the first time (pip's output:" \
  "$VENV/install.log)" >&2
LOG=/dev/null
step
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
LOG="$VENV/install.log"
: > "$LOG"
STEP_LOG_FROM=0
pip_install() {  # pip's output goes to the log (a status line shows where it is); its tail is shown only when it fails
  if ! watch_step "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off \
      -c "$ROOT/constraints.txt" "$@"; then
    tail -n +"$((STEP_LOG_FROM + 1))" "$LOG" | grep -v "is ignored: it is neither a file nor a directory" | tail -30 >&2
    echo "==> pip install $* failed; full log: $LOG" >&2
    exit 1
  fi
}
step
pip_install torch torchvision setuptools wheel
# deepspeed ships as an sdist: build it against the torch above, without its fused CUDA ops, but with the CPU
# shared-memory collective op prebuilt into site-packages. Otherwise every CPU worker JIT-compiles it at start
# into ~/.cache/torch_extensions (40 s to 5 minutes with a cold cache; fails with a read-only HOME).
# DS_ACCELERATOR=cpu: the op is only used by CPU workers, and deepspeed loads a prebuilt op only for the
# accelerator it was built for. Uninstall first and --no-cache-dir: a deepspeed already installed, or a wheel pip
# cached from an earlier build without the op, would otherwise be reused as is.
step
"$VENV/bin/python" -m pip uninstall -y -q deepspeed >>"$LOG" 2>&1 || true
DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 pip_install --no-build-isolation --no-cache-dir deepspeed
if ! DS_ACCELERATOR=cpu "$VENV/bin/python" -c "import deepspeed.ops.comm.deepspeed_shm_comm_op" >>"$LOG" 2>&1; then
  tail -30 "$LOG" >&2
  echo "==> deepspeed was built without its CPU shm op (needs g++ and the Python headers); full log: $LOG" >&2
  exit 1
fi
step
EXPECT=$PINNED  # the whole lock is resolved here (the packages above as already satisfied)
pip_install --no-build-isolation -e "$ROOT[dev]"
# clip_benchmark for the tests that hold filipctl's figures against its exporter and its count
# (tests/test_recall_ties.py): its own code only, pinned by the lock; its captioning extras (pycocoevalcap, ...) are
# not used and not in the lock.
pip_install --no-deps clip_benchmark
# The C++ forward and backward of the CPU late interaction (models/cpu_ops.py loads them; without them the torch
# path runs, ~1.6x slower forward, ~3x slower backward). Built once here, not at a worker's start. x86-64-v3 (AVX2):
# the venv may run on other x86 nodes than this one; a wider target only where it is built is what -march=native
# would risk.
arch_flags=""
[ "$(uname -m)" = "x86_64" ] && arch_flags="-march=x86-64-v3"
step
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
  echo "==> the C++ late-interaction ops did not build (needs g++); the torch path runs instead. Log: $LOG" >&2
fi
echo "$stamp" > "$VENV/.filipctl-env"
echo "==> environment ready: $VENV (in $(fmt_s "$SECONDS"))" >&2
