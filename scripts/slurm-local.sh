#!/usr/bin/env bash
# A real single-node SLURM on this machine, for the `-m slurm` tests (run as root, no systemd needed).
#
#   bash scripts/slurm-local.sh start    # install the Debian packages if missing, start whatever is not
#                                        # running yet, wait until the node takes jobs, then print
#                                        # `export SLURM_CONF=...` (safe to call again while running)
#   bash scripts/slurm-local.sh stop     # cancel every job, then stop only the daemons this script
#                                        # started, found by the pid files in the state directory
#   bash scripts/slurm-local.sh status   # which daemons run, and `sinfo`
#
# Daemons: munged (own key and socket), mariadbd + slurmdbd (accounting), slurmctld, slurmd.
# Accounting is not optional for submitit: it learns a job's state only from `sacct`, so without it a
# cancelled or killed job is never seen to end and `job.result()` waits forever.
#
# Environment:
#   SLURM_LOCAL_DIR   every file the cluster writes (config, state, logs, database); default
#                     $HOME/.cache/slurm-local-run. Remove it for a fresh job-id space.
# Ports (loopback only): slurmctld 6817, slurmd 6818, slurmdbd 6819, MariaDB 13306.
# Every client (sinfo, sbatch, sacct, and submitit, which runs them) needs SLURM_CONF in its environment.
set -euo pipefail

STATE=${SLURM_LOCAL_DIR:-$HOME/.cache/slurm-local-run}
CONF=$STATE/etc/slurm.conf
DBD_CONF=$STATE/etc/slurmdbd.conf
MUNGE_SOCKET=$STATE/munge/munge.socket.2
MARIADB_SOCKET=$STATE/run/mariadbd.sock
MARIADB_PORT=13306
CLUSTER=localcluster
PARTITION=debug
# The node is called localhost whatever `hostname` says; slurmd is told so with -N.
NODE=localhost
export SLURM_CONF=$CONF

say() { echo "slurm-local: $*" >&2; }
die() { say "$*"; exit 1; }

# ---------------------------------------------------------------- processes we own

# The pid in FILE if that process is alive and is the program NAME (a recycled pid is not ours).
# A killed daemon stays a zombie until PID 1 reaps it, and a zombie still has its name: skip those.
owned_pid() {
  local file=$1 name=$2 pid stat
  [[ -s $file ]] || return 1
  pid=$(tr -cd '0-9' <"$file")
  [[ -n $pid && -r /proc/$pid/stat ]] || return 1
  stat=$(</proc/"$pid"/stat) || return 1
  # /proc/PID/stat is "pid (comm) state ...": comm may hold spaces, so split at the last ')'
  [[ ${stat#*(} == "$name) "* && ${stat##*) } != Z* ]] || return 1
  echo "$pid"
}

gone() { ! owned_pid "$@" >/dev/null; }

# retry SECONDS COMMAND...: run COMMAND every 0.2 s until it succeeds or SECONDS have passed.
retry() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

# Daemons in start order, each with the pid file it writes.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
declare -A PIDFILE=(
  [munged]=$STATE/munge/munged.pid [mariadbd]=$STATE/run/mariadbd.pid [slurmdbd]=$STATE/run/slurmdbd.pid
  [slurmctld]=$STATE/run/slurmctld.pid [slurmd]=$STATE/run/slurmd.pid
)

# ---------------------------------------------------------------- packages

install_missing_packages() {
  local -a missing=()
  local pair program package
  for pair in slurmctld:slurmctld slurmd:slurmd sinfo:slurm-client munged:munge \
    slurmdbd:slurmdbd mariadbd:mariadb-server; do
    program=${pair%%:*} package=${pair#*:}
    command -v "$program" >/dev/null || missing+=("$package")
  done
  ((${#missing[@]} == 0)) && return 0
  [[ $(id -u) == 0 ]] || die "missing packages (${missing[*]}) and not root: install them first"
  say "installing ${missing[*]}"
  # Debian starts a package's service on install unless policy-rc.d says no; these daemons must not
  # come up with the system's config, so forbid that for the duration of the install.
  local policy=/usr/sbin/policy-rc.d added_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  local ok=1
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || ok=0
  ((added_policy)) && rm -f "$policy"
  ((ok)) || die "apt-get install ${missing[*]} failed"
}

# ---------------------------------------------------------------- configuration

write_configs() {
  mkdir -p "$STATE"/{etc,munge,state,spool,log,run}
  chmod 755 "$STATE/munge"
  # slurmd refuses a RealMemory above what it detects (node INVALID), so claim 90 % of MemTotal.
  local cpus memory_mb
  cpus=$(nproc)
  memory_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  cat >"$CONF.new" <<EOF
# Written by scripts/slurm-local.sh; rewritten on every start.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again only after this many seconds (default 120)
AuthInfo=cred_expire=10,socket=$MUNGE_SOCKET
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: linuxproc tracking, no task binding, no usage sampling
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
# Links to slurmdbd (slurmctld, sacct, sacctmgr) ignore AuthInfo's socket; this names it for them.
AccountingStoragePass=$MUNGE_SOCKET
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.new" "$CONF"
  # slurmdbd reads slurmdbd.conf beside slurm.conf and insists on mode 600, owned by SlurmUser.
  cat >"$DBD_CONF" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MARIADB_PORT
StorageUser=slurm
StoragePass=slurm-local
StorageLoc=slurm_acct_db
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
DebugLevel=info
EOF
  chmod 600 "$DBD_CONF"
}

# ---------------------------------------------------------------- daemons

start_munged() {
  local key=$STATE/munge/munge.key
  [[ -s $key ]] || head -c 1024 /dev/urandom >"$key"
  chmod 400 "$key"
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"  # left behind by a killed munged
  munged --force --key-file="$key" --socket="$MUNGE_SOCKET" --pid-file="$STATE/munge/munged.pid" \
    --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed"
  retry 10 test -S "$MUNGE_SOCKET" || die "munged made no socket; see $STATE/log/munged.log"
  munge -S "$MUNGE_SOCKET" -n | unmunge -S "$MUNGE_SOCKET" >/dev/null ||
    die "munge credentials do not round-trip; see $STATE/log/munged.log"
}

mariadb_sql() { mariadb --no-defaults --socket="$MARIADB_SOCKET" --user=root "$@"; }

start_mariadbd() {
  local data=$STATE/mysql
  if [[ ! -d $data/mysql ]]; then
    mariadb-install-db --no-defaults --user=root --datadir="$data" --auth-root-authentication-method=socket \
      --skip-test-db >"$STATE/log/mariadb-install-db.log" 2>&1 ||
      die "mariadb-install-db failed; see $STATE/log/mariadb-install-db.log"
  fi
  # mariadbd stays in the foreground: detach it into its own session; it writes its own pid file.
  setsid mariadbd --no-defaults --user=root --datadir="$data" --socket="$MARIADB_SOCKET" \
    --port="$MARIADB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
    --pid-file="$STATE/run/mariadbd.pid" --log-error="$STATE/log/mariadbd.log" \
    --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
  retry 60 mariadb-admin --no-defaults --socket="$MARIADB_SOCKET" --user=root ping ||
    die "mariadbd did not answer within 60 s; see $STATE/log/mariadbd.log"
  mariadb_sql -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm-local';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

start_slurmdbd() {
  slurmdbd
  retry 30 sacctmgr --noheader show cluster || die "slurmdbd did not answer; see $STATE/log/slurmdbd.log"
  if [[ -z $(sacctmgr --noheader --parsable2 show cluster "$CLUSTER" format=cluster 2>/dev/null) ]]; then
    sacctmgr --immediate add cluster "$CLUSTER" >/dev/null
  fi
}

start_slurmctld() {
  slurmctld -f "$CONF" -i  # -i: ignore state files it cannot read (first start, crashed run)
  retry 20 scontrol ping || die "slurmctld did not answer; see $STATE/log/slurmctld.log"
}

start_slurmd() {
  slurmd -f "$CONF" -N "$NODE"
  retry 20 owned_pid "$STATE/run/slurmd.pid" slurmd || die "slurmd did not start; see $STATE/log/slurmd.log"
}

# Start each daemon that is not already running (in dependency order).
start_daemons() {
  local name pid
  for name in "${DAEMONS[@]}"; do
    if pid=$(owned_pid "${PIDFILE[$name]}" "$name"); then
      say "$name already running (pid $pid)"
    else
      "start_$name"
      say "$name started (pid $(owned_pid "${PIDFILE[$name]}" "$name" || echo '?'))"
    fi
  done
}

# Wait until the node accepts jobs; a node left down or drained by an earlier run is resumed.
wait_for_node() {
  local deadline=$((SECONDS + 60)) state=""
  while ((SECONDS < deadline)); do
    state=$(sinfo --noheader --nodes="$NODE" --format=%T 2>/dev/null || true)
    case $state in
      idle* | mixed* | allocated* | completing*) say "node $NODE is $state"; return 0 ;;
      down* | drain* | inval* | fail*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.3
  done
  die "node $NODE not ready after 60 s (state: ${state:-unknown}); see $STATE/log/"
}

stop_daemon() {
  local name=$1 pidfile=$2 pid
  if pid=$(owned_pid "$pidfile" "$name"); then
    kill -TERM "$pid"
    retry 15 gone "$pidfile" "$name" || { say "$name (pid $pid) ignored SIGTERM; killing it"; kill -KILL "$pid"; }
    say "$name stopped (pid $pid)"
  fi
  rm -f "$pidfile"
}

cancel_all_jobs() {
  owned_pid "$STATE/run/slurmctld.pid" slurmctld >/dev/null || return 0
  scancel --full --partition="$PARTITION" >/dev/null 2>&1 || true
  retry 20 bash -c '[[ -z $(squeue --noheader 2>/dev/null) ]]' || say "jobs still listed after scancel"
}

# ---------------------------------------------------------------- commands

cmd_start() {
  install_missing_packages
  write_configs
  start_daemons
  wait_for_node
  echo "export SLURM_CONF=$CONF"
}

cmd_stop() {
  cancel_all_jobs
  # reverse start order: slurmd first, munged last
  local i
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_daemon "${DAEMONS[i]}" "${PIDFILE[${DAEMONS[i]}]}"; done
}

cmd_status() {
  local name pid
  for name in "${DAEMONS[@]}"; do
    if pid=$(owned_pid "${PIDFILE[$name]}" "$name"); then echo "$name running (pid $pid)"; else echo "$name not running"; fi
  done
  [[ -f $CONF ]] && sinfo 2>/dev/null || true
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
