#!/usr/bin/env bash
# Bring up a real two-node Slurm cluster (Debian 12's Slurm 22.05, munge, slurmdbd + MariaDB) on this machine,
# as root, without systemd: the daemons are started directly and left running. The compute nodes are the test
# nodes of scripts/test-nodes.sh (filip-n1, filip-n2: a network and UTS namespace each, on the bridge filip-br0),
# each running its own slurmd; slurmctld, slurmdbd, munged and mariadbd run here, in the root namespace (the
# login host), and the nodes reach the controller at this machine's address on the bridge.
#   scripts/slurm-up.sh           create the nodes, install what is missing, start what is down (a lost node's
#                                 slurmd too), wait until both nodes are usable and sacct answers (about a
#                                 second when everything is already up)
#   scripts/slurm-up.sh --down    stop every daemon (each node's slurmd too) and remove their pid files
#   scripts/slurm-up.sh --status  print each daemon's state (slurmd per node) and sinfo
# Accounting goes through slurmdbd + MariaDB because submitit reads job states from sacct: without it
# every state reads UNKNOWN and a cancelled job's result() hangs.
set -euo pipefail
# Root's PATH in CI can lack the sbin directories, where the daemons, runuser and dpkg's helpers live.
export PATH="/usr/local/sbin:/usr/sbin:/sbin:$PATH"

TEST_NODES="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/test-nodes.sh"
CLUSTER=filip
CTL="$(uname -n)"; CTL="${CTL%%.*}"          # what `hostname -s` prints: slurmctld finds itself in SlurmctldHost by it
NODES=(filip-n1 filip-n2)                     # the compute nodes: test-nodes.sh's, by their host names
# chromium: not Slurm's, but installed here with the other test packages: tests/test_mlflow_review.py reads the MLflow UI
# in it (headless).
PACKAGES=(munge mariadb-server slurmctld slurmd slurmdbd slurm-client procps iproute2 chromium)
DAEMONS=(munged mariadbd slurmdbd slurmctld)  # in the root namespace, in start order; --down stops in reverse
WAIT_S=60
LOG_DIR=/var/log/slurm
SLURM_CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf

say() { echo "==> $*" >&2; }
die() { echo "slurm-up: error: $*" >&2; exit 1; }

# An address from /etc/hosts, where test-nodes.sh writes its nodes and this machine's address on the bridge.
addr_of() { getent ahostsv4 "$1" | awk 'NR == 1 {print $1}'; }

# --- daemons -------------------------------------------------------------------------------------
# A daemon is NAME (in the root namespace) or slurmd@NODE (the slurmd inside that node).

node_of() { case "$1" in *@*) echo "${1#*@}" ;; esac; }

# The pid of a live daemon, found by its exact process name; a node's slurmd among the processes of the node's
# network namespace. Daemons fork to detach, and the parent they leave behind stays a zombie for a few seconds:
# `kill -0` succeeds on it, so skip state Z.
daemon_pid() {
  local node pid inside=""
  node="$(node_of "$1")"
  [ -z "$node" ] || inside=" $(ip netns pids "$node" 2>/dev/null | tr '\n' ' ') "
  for pid in $(pgrep -x "${1%@*}" || true); do
    [ -z "$node" ] || [[ "$inside" == *" $pid "* ]] || continue
    case "$(ps -o stat= -p "$pid" 2>/dev/null)" in Z*|"") ;; *) echo "$pid"; return 0 ;; esac
  done
  return 1
}

# A node's slurmd files are named with %n in slurm.conf, which slurmd replaces by its node name.
pid_file() {
  case "$1" in
    munged)   echo /run/munge/munged.pid ;;
    mariadbd) echo /run/mysqld/mysqld.pid ;;
    slurmd@*) echo "/run/slurmd-$(node_of "$1").pid" ;;
    *)        echo "/run/$1.pid" ;;
  esac
}

log_file() {
  case "$1" in
    munged)   echo /var/log/munge/munged.log ;;
    mariadbd) echo /var/log/mysql/error.log ;;
    slurmd@*) echo "$LOG_DIR/slurmd-$(node_of "$1").log" ;;
    *)        echo "$LOG_DIR/$1.log" ;;
  esac
}

out_file() { echo "$LOG_DIR/${1/@/-}.out"; }  # what a daemon printed while starting

# Fail naming the daemon, with the end of its log and of what it printed at start: the reason is there.
fail_daemon() {
  local log
  echo "slurm-up: error: $1 $2" >&2
  for log in "$(log_file "$1")" "$(out_file "$1")"; do
    [ -s "$log" ] && { echo "--- last lines of $log:" >&2; tail -n 20 "$log" >&2; }
  done
  exit 1
}

# Poll a check command until it succeeds, for at most WAIT_S seconds; stop early when the daemon it
# waits for has exited (after 2 s: mariadbd, started in the background, takes a moment to appear).
wait_for() {
  local name="$1" start=$SECONDS; shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS - start < 2)) || daemon_pid "$name" >/dev/null || fail_daemon "$name" "exited"
    ((SECONDS - start < WAIT_S)) || fail_daemon "$name" "did not come up within ${WAIT_S}s"
    sleep 0.2
  done
}

# Start one daemon unless it runs. Stale pid files from a killed daemon break its next start.
start_daemon() {
  local name="$1"
  daemon_pid "$name" >/dev/null && return 0
  rm -f "$(pid_file "$name")"
  # stdio goes to a file of its own, not the caller's: a daemon holding the caller's stdout makes
  # `$(scripts/slurm-up.sh)` or `... | tee` wait for it forever. Not to the daemon's log either: a log
  # created here would belong to root, and the daemons write theirs as their own users.
  case "$name" in
    munged)   runuser -u munge -- /usr/sbin/munged --force ;;
    # mariadbd does not daemonize: setsid detaches it from this script's session.
    mariadbd) setsid /usr/sbin/mariadbd --user=mysql --skip-networking \
                --log-error="$(log_file mariadbd)" & ;;
    # Inside its node: the node's address, and its host name, by which slurmd finds its NodeName.
    slurmd@*) "$TEST_NODES" --exec "$(node_of "$name")" /usr/sbin/slurmd ;;
    *)        "/usr/sbin/$name" ;;
  esac </dev/null >"$(out_file "$name")" 2>&1 || fail_daemon "$name" "failed to start"
  # `timeout`: a Slurm client can block for tens of seconds on a port that accepts but never answers.
  case "$name" in
    munged)    wait_for munged munge_works ;;
    mariadbd)  wait_for mariadbd mariadb-admin ping ;;
    slurmdbd)  wait_for slurmdbd timeout 5 sacctmgr -n list cluster ;;
    slurmctld) wait_for slurmctld timeout 5 scontrol ping ;;
    slurmd@*)  wait_for "$name" daemon_pid "$name" ;;
  esac
  say "$name up"
}

munge_works() { munge -n | unmunge; }

stop_daemon() {
  local name="$1" pid i
  if pid="$(daemon_pid "$name")"; then
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do daemon_pid "$name" >/dev/null || break; sleep 0.1; done
    if pid="$(daemon_pid "$name")"; then
      say "$name ignored SIGTERM for 30s: killing it"
      kill -9 "$pid" 2>/dev/null || true
      sleep 0.5
    fi
    say "$name stopped"
  fi
  rm -f "$(pid_file "$name")"
}

# The single-node cluster this script brought up before ran its slurmd here, in the root namespace, as node
# `$CTL`, which no longer exists: stop that one (never a node's).
stop_root_slurmd() {
  local pid node ours=" "
  for node in "${NODES[@]}"; do ours+="$(ip netns pids "$node" 2>/dev/null | tr '\n' ' ')"; done
  for pid in $(pgrep -x slurmd || true); do
    [[ "$ours " == *" $pid "* ]] && continue
    kill "$pid" 2>/dev/null && say "stopped the slurmd of the former single-node cluster (pid $pid)"
  done
  rm -f /run/slurmd.pid
}

# --- installation and configuration --------------------------------------------------------------

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]} (about 20 s)"
  # The image's policy-rc.d keeps the packages' scripts from starting daemons: this script does.
  apt-get update -qq >/dev/null || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >/dev/null || die "apt-get install ${missing[*]} failed"
}

# Write $1 (owner $2, mode $3) from stdin only when its content changes; succeed when it changed.
write_if_changed() {
  local file="$1" owner="$2" mode="$3" tmp
  tmp="$(mktemp)"; cat >"$tmp"
  if cmp -s "$tmp" "$file"; then rm -f "$tmp"; return 1; fi
  install -o "$owner" -g "$owner" -m "$mode" "$tmp" "$file"; rm -f "$tmp"
  return 0
}

slurm_conf() {
  local mem_mb cpus ctl_addr node
  # The nodes share this machine's memory: each claims its share, leaving 10% to the system.
  mem_mb=$(awk -v n=${#NODES[@]} '/^MemTotal:/ {print int($2 / 1024 * 0.9 / n)}' /proc/meminfo)
  # At least 8 CPUs per node (config_overrides lets a node claim more than it has), so 8-task jobs
  # run on a 2-core machine by oversubscribing it.
  cpus=$(nproc); ((cpus < 8)) && cpus=8
  ctl_addr="$(addr_of filip-login)"
  cat <<EOF
# Written by scripts/slurm-up.sh: two compute nodes (scripts/test-nodes.sh) and the controller on the
# login host. Edits are overwritten.
ClusterName=$CLUSTER
# The name is this machine's (slurmctld checks it against its own); the address is where the nodes reach it.
SlurmctldHost=$CTL($ctl_addr)
SlurmUser=slurm
AuthType=auth/munge
# A requeued job may start again only cred_expire + 1 s later (default 120 s); 10 s is still ample
# for a step on a node to present its credential.
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Start a submitted job within about a second instead of three. The main loop runs every 2 s instead of
# 60 s: it alone starts a job whose begin time passes with nothing else happening (a requeued job).
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_interval=2
# Reject impossible requests at submit instead of leaving them pending forever.
EnforcePartLimits=ALL
# A batch job submitted with --requeue (filipctl's are) goes back to the queue when one of its nodes fails.
JobRequeue=1
# A node that was down (lost, its slurmd killed) is back as soon as its slurmd registers again.
ReturnToService=2
# A node whose slurmd has not answered for this long is down, and its jobs requeued (default 300 s): a lost test
# node is noticed in about 20 s, while a busy one still has 10 s to answer.
SlurmdTimeout=10
KillWait=5
SlurmdParameters=config_overrides
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$(pid_file slurmctld)
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$(log_file slurmctld)
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
AccountingStorageType=accounting_storage/slurmdbd
# The bridge address, not localhost: sacct and sstat inside a job on a node reach slurmdbd too.
AccountingStorageHost=$ctl_addr
JobAcctGatherType=jobacct_gather/linux
EOF
  for node in "${NODES[@]}"; do
    echo "NodeName=$node NodeAddr=$(addr_of "$node") CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
}

slurmdbd_conf() {
  # slurmdbd logs into MariaDB as DB user slurm through the unix socket ("localhost"), authenticated
  # by its OS user (unix_socket plugin): no password to keep anywhere.
  cat <<EOF
# Written by scripts/slurm-up.sh. Edits are overwritten.
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
PidFile=$(pid_file slurmdbd)
LogFile=$(log_file slurmdbd)
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
EOF
}

# Directories, keys and config files. A changed config restarts the daemons that read it.
configure() {
  local node
  # slurmctld looks its own name up. (Containers often map it to 127.0.0.1 in /etc/hosts: harmless here, the
  # nodes reach the controller at the address slurm.conf gives it, never by this name.)
  getent hosts "$CTL" >/dev/null || { echo "127.0.0.1 $CTL" >>/etc/hosts; say "added $CTL to /etc/hosts"; }
  for node in filip-login "${NODES[@]}"; do
    [ -n "$(addr_of "$node")" ] || die "$node does not resolve: scripts/test-nodes.sh writes it into /etc/hosts"
  done
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  install -d -o mysql -g adm -m 2750 /var/log/mysql   # for --log-error; the package does not create it
  install -d -o slurm -g slurm -m 0755 /var/spool/slurmctld "$LOG_DIR"
  for node in "${NODES[@]}"; do install -d -m 0755 "/var/spool/slurmd/$node"; done
  if [ ! -s /etc/munge/munge.key ]; then
    runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    say "created the munge key"
  fi
  if [ ! -d /var/lib/mysql/mysql ]; then
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    say "created the MariaDB data directory"
  fi
  if slurmdbd_conf | write_if_changed "$DBD_CONF" slurm 600; then
    say "wrote $DBD_CONF"; stop_daemon slurmdbd
  fi
  if slurm_conf | write_if_changed "$SLURM_CONF" root 644; then
    say "wrote $SLURM_CONF"
    for node in "${NODES[@]}"; do stop_daemon "slurmd@$node"; done
    stop_daemon slurmctld
  fi
  stop_root_slurmd
}

# The accounting database and its user, created once through root's socket login.
create_database() {
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED VIA unix_socket;
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" \
    || die "could not create the slurm_acct_db database in MariaDB"
}

node_state() { sinfo -h -N -n "$1" -o %T 2>/dev/null; }

nodes_usable() {
  local node
  for node in "${NODES[@]}"; do
    case "$(node_state "$node")" in idle|mixed|allocated|completing) ;; *) return 1 ;; esac
  done
}

# A node drained by an earlier failure (for instance a job that outlived KillWait) stays drained across
# restarts, and one set down by hand stays down: give them back to the scheduler. (A node that was down because
# its slurmd was lost comes back by itself once its slurmd registers again: ReturnToService=2.)
resume_nodes() {
  local node
  for node in "${NODES[@]}"; do
    case "$(node_state "$node")" in
      drain*|down) scontrol update NodeName="$node" State=RESUME && say "resumed node $node" ;;
    esac
  done
}

# --- commands ------------------------------------------------------------------------------------

up() {
  local node
  [ "$(id -u)" -eq 0 ] || die "run as root: it installs packages and starts system daemons"
  "$TEST_NODES"
  install_packages
  configure
  start_daemon munged
  start_daemon mariadbd
  create_database
  start_daemon slurmdbd
  # slurmctld adds its cluster (and the root account) to slurmdbd when it first registers: jobs run
  # and are recorded without associations, since AccountingStorageEnforce is unset.
  start_daemon slurmctld
  for node in "${NODES[@]}"; do start_daemon "slurmd@$node"; done
  resume_nodes
  wait_for slurmctld nodes_usable
  wait_for slurmdbd timeout 5 sacct -n -X -j 1
  say "slurm up: $(sinfo -h -N -o '%N %T' | paste -sd, | sed 's/,/, /g'); partition debug, cluster $CLUSTER"
}

down() {
  local i node
  for node in "${NODES[@]}"; do stop_daemon "slurmd@$node"; done
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_daemon "${DAEMONS[i]}"; done
  say "slurm down"
}

status() {
  local name pid
  for name in "${DAEMONS[@]}" "${NODES[@]/#/slurmd@}"; do
    if pid="$(daemon_pid "$name")"; then
      printf '%-16s running (pid %s)\n' "$name" "$pid"
    else
      printf '%-16s stopped\n' "$name"
    fi
  done
  if daemon_pid slurmctld >/dev/null; then sinfo -N; else echo "sinfo: slurmctld is not running"; fi
}

case "${1:-}" in
  "")       up ;;
  --down)   down ;;
  --status) status ;;
  *)        die "usage: $0 [--down|--status]" ;;
esac
