#!/usr/bin/env bash
# Bring up a real two-node Ray cluster on the test nodes (scripts/test-nodes.sh): the head on filip-n1 (GCS
# 10.77.0.11:6379, dashboard and Jobs API http://10.77.0.11:8265), a worker on filip-n2, 2 CPUs each. Ray binds
# every interface: inside a node namespace that is the node's loopback and its bridge address, nothing else.
#   scripts/ray-up.sh           start what is down, wait until both nodes are in the cluster (~2 s when up)
#   scripts/ray-up.sh --down    stop the Ray processes on both nodes (never `ray stop`: it would stop every Ray
#                               on this machine, other tests' private ones included)
#   scripts/ray-up.sh --status  `ray status` of the cluster
#   scripts/ray-up.sh --kill NODE  SIGKILL every Ray process on NODE (raylet, workers, what they started): the node
#                               is lost to Ray, while Slurm's daemons and jobs on the same test node go on
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODES="$ROOT/scripts/test-nodes.sh"
RAY="$ROOT/.venv/bin/ray"
NET="${FILIP_TEST_NET:-10.77.0}"
HEAD_ADDR="$NET.11"
GCS="$HEAD_ADDR:6379"
CPUS="${FILIP_RAY_CPUS:-2}"
WAIT_S=90
# Ray's own token authentication is not configured on the test cluster (its ports are on the private bridge).
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0

say() { echo "==> $*" >&2; }
die() { echo "ray-up: error: $*" >&2; exit 1; }

# The Ray processes of one node: those in its network namespace that Ray started (not slurmd or Slurm jobs).
ray_pids() {
  local pid cmd
  for pid in $(ip netns pids "$1" 2>/dev/null); do
    cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || continue
    case "$cmd" in *raylet*|*gcs_server*|*/ray/*|ray::*|*ray_client_server*|*dashboard*) echo "$pid" ;; esac
  done
}

alive_nodes() {  # how many nodes the head's GCS counts as alive (0 when the head is down)
  # Nothing listens at the GCS port: down (`ray status` would retry for a minute).
  timeout 2 bash -c "</dev/tcp/$HEAD_ADDR/6379" 2>/dev/null || { echo 0; return 0; }
  { "$NODES" --exec filip-n1 timeout 20 "$RAY" status --address="$GCS" 2>/dev/null || true; } \
    | awk '/^Active:/ {a=1; next} /^Pending:/ {a=0} a && /node_/ {n++} END {print n+0}'
}

kill_node() {
  local pids
  pids="$(ray_pids "$1")"
  [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
  say "killed $(echo $pids | wc -w) Ray processes on $1"
}

stop_node() {
  local pids
  pids="$(ray_pids "$1")"
  [ -z "$pids" ] && return 0
  kill $pids 2>/dev/null || true
  sleep 2
  pids="$(ray_pids "$1")"; [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
  say "ray stopped on $1"
}

start() {
  local node="$1" addr="$2"; shift 2
  # A temp dir per node: the nodes share this file system, and two raylets must not share session sockets.
  "$NODES" --exec "$node" "$RAY" start --node-ip-address="$addr" --num-cpus="$CPUS" --disable-usage-stats \
    --temp-dir="/tmp/ray-$node" --object-store-memory=500000000 "$@" >"/tmp/ray-up-$node.log" 2>&1 \
    || { tail -20 "/tmp/ray-up-$node.log" >&2; die "ray start on $node failed (log: /tmp/ray-up-$node.log)"; }
}

up() {
  [ -x "$RAY" ] || die "no $RAY: run scripts/env.sh first"
  bash "$NODES"
  local n start=$SECONDS
  n="$(alive_nodes)"
  # The GCS keeps counting a killed node for its health-check timeout: a node is up only when its raylet runs.
  node_raylet() { [ -n "$(ray_pids "$1" | head -1)" ]; }
  if [ "$n" -ge 2 ] && node_raylet filip-n2; then say "ray up: 2 nodes, head $GCS"; return 0; fi
  if [ "$n" -eq 0 ]; then  # no head: whatever is left on either node belonged to the old cluster
    stop_node filip-n1; stop_node filip-n2
    start filip-n1 "$HEAD_ADDR" --head --port=6379 --include-dashboard=true --dashboard-host=0.0.0.0
    say "ray head up on filip-n1 ($GCS, Jobs API http://$HEAD_ADDR:8265)"
  else
    stop_node filip-n2
  fi
  start filip-n2 "$NET.12" --address="$GCS"
  until [ "$(alive_nodes)" -ge 2 ]; do
    ((SECONDS - start < WAIT_S)) || die "the Ray cluster did not reach 2 nodes within ${WAIT_S}s"
    sleep 1
  done
  say "ray up: 2 nodes, head $GCS"
}

case "${1:-}" in
  "")       up ;;
  --down)   stop_node filip-n2; stop_node filip-n1 ;;
  --status) "$NODES" --exec filip-n1 "$RAY" status --address="$GCS" ;;
  --kill)   case "${2:-}" in filip-n1|filip-n2) kill_node "$2" ;; *) die "usage: $0 --kill filip-n1|filip-n2" ;; esac ;;
  *)        die "usage: $0 [--down|--status|--kill NODE]" ;;
esac
