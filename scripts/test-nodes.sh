#!/usr/bin/env bash
# Two test "nodes" on this machine, for the two-node Slurm and Ray test clusters: each node is a network
# namespace (its own address on a private bridge) with its own UTS namespace (its own host name). The bridge and
# every address are the project's own; nothing else is ever addressed. The file system is shared by all nodes,
# as a cluster file system would be. Needs root.
#
#   scripts/test-nodes.sh                  create what is missing (idempotent; well under a second when up)
#   scripts/test-nodes.sh --down           remove the nodes and the bridge (kills what runs in them)
#   scripts/test-nodes.sh --status         print the nodes, their addresses and how many processes run in each
#   scripts/test-nodes.sh --exec NODE CMD  run CMD on NODE (in its network and UTS namespaces)
#   scripts/test-nodes.sh --kill NODE      SIGKILL every process on NODE: the node is lost (its namespaces stay,
#                                          so that the daemons can be started on it again)
#
# Nodes: filip-n1 (10.77.0.11), filip-n2 (10.77.0.12). This machine is 10.77.0.1 on the bridge (filip-login),
# where slurmctld answers the nodes. Override the subnet with FILIP_TEST_NET=10.78.0 if 10.77.0.0/24 is taken.
set -euo pipefail
export PATH="/usr/local/sbin:/usr/sbin:/sbin:$PATH"

NET="${FILIP_TEST_NET:-10.77.0}"
BRIDGE=filip-br0
NODES=(filip-n1 filip-n2)
UTS_DIR=/run/filip-nodes          # the UTS namespaces, bound to files here (ip netns keeps its own in /run/netns)
HOSTS_MARK="# filipctl test nodes"

say() { echo "==> $*" >&2; }
die() { echo "test-nodes: error: $*" >&2; exit 1; }

addr_of() {  # NODE -> its address on the bridge
  case "$1" in
    filip-n1) echo "$NET.11" ;;
    filip-n2) echo "$NET.12" ;;
    filip-login) echo "$NET.1" ;;
    *) die "unknown node $1 (nodes: ${NODES[*]})" ;;
  esac
}

node_up() { [ -e "/run/netns/$1" ] && [ -e "$UTS_DIR/$1" ] && ip netns exec "$1" ip -4 addr show | grep -q " $(addr_of "$1")/"; }

bridge() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    # Refuse a subnet some interface of this machine already uses: the test nodes must not shadow a real network.
    if ip -4 route show | grep -q "^$NET\.0/24"; then die "$NET.0/24 is already routed here; set FILIP_TEST_NET"; fi
    ip link add "$BRIDGE" type bridge
    ip addr add "$NET.1/24" dev "$BRIDGE"
    say "created bridge $BRIDGE ($NET.1/24)"
  fi
  ip link set "$BRIDGE" up
}

node() {
  local name="$1" addr veth="${1#filip-}"
  addr="$(addr_of "$name")"
  node_up "$name" && return 0
  [ -e "/run/netns/$name" ] || ip netns add "$name"
  if [ ! -e "$UTS_DIR/$name" ]; then
    mkdir -p "$UTS_DIR"; touch "$UTS_DIR/$name"
    unshare --uts="$UTS_DIR/$name" hostname "$name"
  fi
  if ! ip netns exec "$name" ip link show "eth-$veth" >/dev/null 2>&1; then
    ip link del "fbr-$veth" 2>/dev/null || true
    ip link add "fbr-$veth" type veth peer name "eth-$veth"
    ip link set "eth-$veth" netns "$name"
    ip link set "fbr-$veth" master "$BRIDGE"
    ip link set "fbr-$veth" up
  fi
  ip netns exec "$name" ip link set lo up
  ip netns exec "$name" ip addr replace "$addr/24" dev "eth-$veth"
  ip netns exec "$name" ip link set "eth-$veth" up
  say "node $name up ($addr)"
}

# Every process resolves the node names through /etc/hosts, on the nodes as here.
hosts() {
  local want name
  want="$(for name in filip-login "${NODES[@]}"; do echo "$(addr_of "$name") $name $HOSTS_MARK"; done)"
  if [ "$(grep -F "$HOSTS_MARK" /etc/hosts || true)" != "$want" ]; then
    # /etc/hosts may be a bind mount (containers): rewrite it in place rather than replacing the file.
    local rest; rest="$(grep -vF "$HOSTS_MARK" /etc/hosts || true)"
    printf '%s\n%s\n' "$rest" "$want" >/etc/hosts
    say "wrote the test nodes into /etc/hosts"
  fi
}

up() {
  [ "$(id -u)" -eq 0 ] || die "run as root: it creates network namespaces and a bridge"
  bridge
  for n in "${NODES[@]}"; do node "$n"; done
  hosts
}

node_pids() { ip netns pids "$1" 2>/dev/null || true; }

kill_node() {
  local pids
  pids="$(node_pids "$1")"
  [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
  say "killed $(echo $pids | wc -w) processes on $1"
}

down() {
  local n
  for n in "${NODES[@]}"; do
    kill_node "$n"
    ip netns del "$n" 2>/dev/null || true
    umount "$UTS_DIR/$n" 2>/dev/null || true; rm -f "$UTS_DIR/$n"
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  say "test nodes down"
}

status() {
  local n
  for n in "${NODES[@]}"; do
    if node_up "$n"; then printf '%-9s %-12s up, %s processes\n' "$n" "$(addr_of "$n")" "$(node_pids "$n" | wc -w)"
    else printf '%-9s %-12s down\n' "$n" "$(addr_of "$n")"; fi
  done
}

exec_on() {
  local name="$1"; shift
  node_up "$name" || die "node $name is not up (scripts/test-nodes.sh)"
  exec nsenter --net="/run/netns/$name" --uts="$UTS_DIR/$name" -- "$@"
}

case "${1:-}" in
  "")       up ;;
  --down)   down ;;
  --status) status ;;
  --exec)   [ $# -ge 3 ] || die "usage: $0 --exec NODE CMD..."; shift; exec_on "$@" ;;
  --kill)   [ $# -eq 2 ] || die "usage: $0 --kill NODE"; addr_of "$2" >/dev/null; kill_node "$2" ;;
  *)        die "usage: $0 [--down|--status|--exec NODE CMD...|--kill NODE]" ;;
esac
