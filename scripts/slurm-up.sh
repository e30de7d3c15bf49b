#!/usr/bin/env bash
# Bring up a real single-node Slurm cluster (Debian 12's Slurm 22.05, munge, slurmdbd + MariaDB) on
# this machine, as root, without systemd: the daemons are started directly and left running.
#   scripts/slurm-up.sh           install what is missing, start what is down, wait until the node is
#                                 idle and sacct answers (under a second when everything is already up)
#   scripts/slurm-up.sh --down    stop every daemon and remove their pid files
#   scripts/slurm-up.sh --status  print each daemon's state and sinfo
# Accounting goes through slurmdbd + MariaDB because submitit reads job states from sacct: without it
# every state reads UNKNOWN and a cancelled job's result() hangs.
set -euo pipefail
# Root's PATH in CI can lack the sbin directories, where the daemons, runuser and dpkg's helpers live.
export PATH="/usr/local/sbin:/usr/sbin:/sbin:$PATH"

CLUSTER=filip
NODE="$(uname -n)"; NODE="${NODE%%.*}"           # what `hostname -s` prints; slurmd looks itself up by it
PACKAGES=(munge mariadb-server slurmctld slurmd slurmdbd slurm-client procps)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; --down stops in reverse
WAIT_S=60
LOG_DIR=/var/log/slurm
SLURM_CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf

say() { echo "==> $*" >&2; }
die() { echo "slurm-up: error: $*" >&2; exit 1; }

# --- daemons -------------------------------------------------------------------------------------

# The pid of a live daemon, found by its exact process name. Daemons fork to detach, and the parent
# they leave behind stays a zombie for a few seconds: `kill -0` succeeds on it, so skip state Z.
daemon_pid() {
  local pid
  for pid in $(pgrep -x "$1" || true); do
    case "$(ps -o stat= -p "$pid" 2>/dev/null)" in Z*|"") ;; *) echo "$pid"; return 0 ;; esac
  done
  return 1
}

pid_file() {
  case "$1" in
    munged)   echo /run/munge/munged.pid ;;
    mariadbd) echo /run/mysqld/mysqld.pid ;;
    *)        echo "/run/$1.pid" ;;
  esac
}

log_file() {
  case "$1" in
    munged)   echo /var/log/munge/munged.log ;;
    mariadbd) echo /var/log/mysql/error.log ;;
    *)        echo "$LOG_DIR/$1.log" ;;
  esac
}

# Fail naming the daemon, with the end of its log and of what it printed at start: the reason is there.
fail_daemon() {
  local log
  echo "slurm-up: error: $1 $2" >&2
  for log in "$(log_file "$1")" "$LOG_DIR/$1.out"; do
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
    *)        "/usr/sbin/$name" ;;
  esac </dev/null >"$LOG_DIR/$name.out" 2>&1 || fail_daemon "$name" "failed to start"
  # `timeout`: a Slurm client can block for tens of seconds on a port that accepts but never answers.
  case "$name" in
    munged)    wait_for munged munge_works ;;
    mariadbd)  wait_for mariadbd mariadb-admin ping ;;
    slurmdbd)  wait_for slurmdbd timeout 5 sacctmgr -n list cluster ;;
    slurmctld) wait_for slurmctld timeout 5 scontrol ping ;;
    slurmd)    wait_for slurmd daemon_pid slurmd ;;
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
  local mem_mb cpus
  # Leave 10% of the memory to the system, so that a job asking for the whole node still fits.
  mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  # At least 8 CPUs (config_overrides lets the node claim more than it has), so 8-task jobs
  # run on a 2-core machine by oversubscribing it.
  cpus=$(nproc); ((cpus < 8)) && cpus=8
  cat <<EOF
# Written by scripts/slurm-up.sh: a single-node cluster. Edits are overwritten.
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmUser=slurm
AuthType=auth/munge
# A requeued job may start again only cred_expire + 1 s later (default 120 s); 10 s is still ample
# for a step on this node to present its credential.
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
JobRequeue=1
ReturnToService=2
KillWait=5
SlurmdParameters=config_overrides
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$(pid_file slurmctld)
SlurmdPidFile=$(pid_file slurmd)
SlurmctldLogFile=$(log_file slurmctld)
SlurmdLogFile=$(log_file slurmd)
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
NodeName=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
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
  # slurmd and the commands find the controller by this name.
  getent hosts "$NODE" >/dev/null || { echo "127.0.0.1 $NODE" >>/etc/hosts; say "added $NODE to /etc/hosts"; }
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  install -d -o mysql -g adm -m 2750 /var/log/mysql   # for --log-error; the package does not create it
  install -d -o slurm -g slurm -m 0755 /var/spool/slurmctld "$LOG_DIR"
  install -d -m 0755 /var/spool/slurmd
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
    say "wrote $SLURM_CONF"; stop_daemon slurmd; stop_daemon slurmctld
  fi
}

# The accounting database and its user, created once through root's socket login.
create_database() {
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED VIA unix_socket;
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" \
    || die "could not create the slurm_acct_db database in MariaDB"
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null; }

node_usable() {
  case "$(node_state)" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac
}

# A node drained by an earlier failure (for instance a job that outlived KillWait) stays drained
# across restarts: give it back to the scheduler.
resume_if_drained() {
  case "$(node_state)" in
    drain*) scontrol update NodeName="$NODE" State=RESUME; say "resumed drained node $NODE" ;;
  esac
}

# --- commands ------------------------------------------------------------------------------------

up() {
  [ "$(id -u)" -eq 0 ] || die "run as root: it installs packages and starts system daemons"
  install_packages
  configure
  start_daemon munged
  start_daemon mariadbd
  create_database
  start_daemon slurmdbd
  # slurmctld adds its cluster (and the root account) to slurmdbd when it first registers: jobs run
  # and are recorded without associations, since AccountingStorageEnforce is unset.
  start_daemon slurmctld
  start_daemon slurmd
  resume_if_drained
  wait_for slurmd node_usable
  wait_for slurmdbd timeout 5 sacct -n -X -j 1
  say "slurm up: node $NODE $(node_state), partition debug, cluster $CLUSTER"
}

down() {
  local i
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_daemon "${DAEMONS[i]}"; done
  say "slurm down"
}

status() {
  local name pid
  for name in "${DAEMONS[@]}"; do
    if pid="$(daemon_pid "$name")"; then
      printf '%-10s running (pid %s)\n' "$name" "$pid"
    else
      printf '%-10s stopped\n' "$name"
    fi
  done
  if daemon_pid slurmctld >/dev/null; then sinfo; else echo "sinfo: slurmctld is not running"; fi
}

case "${1:-}" in
  "")       up ;;
  --down)   down ;;
  --status) status ;;
  *)        die "usage: $0 [--down|--status]" ;;
esac
