#!/usr/bin/env bash
# A throw-away one-node Slurm cluster on this machine (tests/test_slurm_cluster.py; or to try
# hydra/launcher=slurm by hand):
#
#   scripts/slurm_local.sh up [DIR]     # install what is missing (apt-get, as root), start it all
#   source DIR/env.sh                   # SLURM_CONF for sbatch / squeue / sacct / scontrol
#   scripts/slurm_local.sh down [DIR]   # cancel its jobs, stop what `up` started (by PID)
#
# DIR defaults to /tmp/hesscale-slurm. `up`:
# 1. installs Debian's slurm-wlm (slurmctld, slurmd, client commands), slurmdbd, munge and
#    mariadb-server when a command is missing (no service is started by the install);
# 2. writes slurm.conf / slurmdbd.conf for this host into DIR (free ports on 127.0.0.1; one
#    partition `debug` with this host's CPUs; proctrack/linuxproc, task/none, select/cons_tres);
# 3. starts, each in the foreground of its own background process (pid in DIR/pids, log in
#    DIR/log/): munged with a fresh key, mariadbd on a private data folder, slurmdbd (job
#    accounting, so `sacct` answers; the cluster is registered with sacctmgr), slurmctld, slurmd;
# 4. waits until `sinfo` shows the node idle.
# `down` cancels the cluster's jobs, then stops the pids in DIR/pids (TERM, KILL after 20 s),
# newest first, each only while its process still runs the command `up` started there.
# Exit code 3: this machine cannot run it (not root and packages missing, no apt-get, the install
# failed), with the reason on stderr; 1: a daemon did not come up (its log's tail is printed).
set -euo pipefail

ACTION=${1:-}
DIR=$(realpath -m "${2:-/tmp/hesscale-slurm}")
CLUSTER=hesscale
NODE=$(hostname -s)
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)
COMMANDS=(slurmctld slurmd slurmdbd sbatch sacct sacctmgr munged mungekey mariadbd mariadb-install-db mariadb)
export PATH="$PATH:/usr/sbin:/sbin"

cannot() { echo "slurm_local.sh: cannot bring up a cluster here: $*" >&2; exit 3; }
die() { echo "slurm_local.sh: $*" >&2; exit 1; }

install_missing() {
  local missing=() c
  for c in "${COMMANDS[@]}"; do command -v "$c" >/dev/null || missing+=("$c"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || cannot "${missing[*]} missing and not root (apt-get install ${PACKAGES[*]})"
  command -v apt-get >/dev/null || cannot "${missing[*]} missing and no apt-get"
  echo "slurm_local.sh: installing ${PACKAGES[*]} (missing: ${missing[*]})" >&2
  local policy=/usr/sbin/policy-rc.d ours=0
  if [ ! -e "$policy" ]; then  # keep the packages from starting their system services
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && ours=1
  fi
  local ok=1
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${PACKAGES[@]}"; } > "$DIR/log/apt.log" 2>&1 || ok=0
  [ "$ours" -eq 1 ] && rm -f "$policy"
  [ "$ok" -eq 1 ] || cannot "apt-get install ${PACKAGES[*]} failed: $(tail -n 1 "$DIR/log/apt.log")"
  for c in "${missing[@]}"; do
    command -v "$c" >/dev/null || cannot "$c still missing after apt-get install ${PACKAGES[*]}"
  done
}

free_port() {  # a port nothing listens on, not yet handed out ($USED)
  local p
  while :; do
    p=$((20000 + RANDOM % 30000))
    case " $USED " in *" $p "*) continue ;; esac
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then USED="$USED $p"; echo "$p"; return; fi
  done
}

start() {  # start NAME CMD...: run CMD in the background, remember its pid
  local name=$1; shift
  "$@" < /dev/null > "$DIR/log/$name.out" 2>&1 &
  echo "$! $name $1" >> "$DIR/pids"
}

wait_for() {  # wait_for NAME SECONDS CMD...: until CMD succeeds; else the daemon's log, exit 1
  local name=$1 secs=$2 end=$((SECONDS + $2)); shift 2
  until timeout 10 "$@" > /dev/null 2>&1; do
    if [ "$SECONDS" -ge "$end" ]; then
      tail -n 20 "$DIR/log/$name".* >&2 || true
      die "$name did not come up within ${secs}s (logs: $DIR/log/$name.*)"
    fi
    sleep 0.25
  done
}

write_configs() {
  local cpus mem_mb
  cpus=$(nproc)
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 9 / 10240 ))
  USED=""
  local ctld_port slurmd_port dbd_port db_port
  ctld_port=$(free_port); slurmd_port=$(free_port); dbd_port=$(free_port); db_port=$(free_port)
  DB_PORT=$db_port
  DB_PASS=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
  cat > "$DIR/slurm.conf" <<EOF
# one-node cluster written by scripts/slurm_local.sh
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
CredType=cred/munge
SchedulerParameters=bf_interval=2,sched_interval=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
KillWait=30
MinJobAge=60
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
AccountingStoragePass=$DIR/munge/munge.socket
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$NODE NodeHostname=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  cat > "$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/slurmdbd.conf"
  echo "export SLURM_CONF=$DIR/slurm.conf" > "$DIR/env.sh"
}

up() {
  [ -s "$DIR/pids" ] && die "$DIR already holds a cluster (scripts/slurm_local.sh down $DIR first)"
  mkdir -p "$DIR"/{log,run,state,spool,munge,db}
  chmod 700 "$DIR/munge"
  install_missing
  [ "$(id -u)" -eq 0 ] || cannot "the daemons need root (SlurmUser=root)"
  write_configs
  export SLURM_CONF=$DIR/slurm.conf
  : > "$DIR/pids"

  mungekey --create --force --keyfile="$DIR/munge/munge.key" > /dev/null
  chmod 400 "$DIR/munge/munge.key"
  start munged munged -F --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/run/munged.pid" --seed-file="$DIR/munge/munge.seed" --log-file="$DIR/log/munged.log"
  wait_for munged 20 test -S "$DIR/munge/munge.socket"

  mariadb-install-db --no-defaults --datadir="$DIR/db" --user=root --skip-test-db \
    --auth-root-authentication-method=socket > "$DIR/log/mariadb-install.log" 2>&1 \
    || { tail -n 20 "$DIR/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
  start mariadbd mariadbd --no-defaults --datadir="$DIR/db" --user=root --socket="$DIR/run/mysqld.sock" \
    --bind-address=127.0.0.1 --port="$DB_PORT" --pid-file="$DIR/run/mariadbd.pid" --skip-name-resolve \
    --skip-log-bin --performance-schema=OFF --innodb-buffer-pool-size=32M --log-error="$DIR/log/mariadbd.log"
  local sql=(mariadb --no-defaults --socket="$DIR/run/mysqld.sock" -u root)
  wait_for mariadbd 60 "${sql[@]}" -e "SELECT 1"
  "${sql[@]}" -e "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
                  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

  start slurmdbd slurmdbd -D
  wait_for slurmdbd 60 sacctmgr -n list cluster
  sacctmgr -i -Q add cluster "$CLUSTER" > /dev/null

  start slurmctld slurmctld -D -c
  wait_for slurmctld 60 scontrol ping
  start slurmd slurmd -D -N "$NODE"
  wait_for slurmd 60 sh -c "sinfo -h -n '$NODE' -o %T | grep -qx idle"
  echo "slurm_local.sh: cluster up ($(sinfo -h -o '%P %D node %c CPUs %T')); source $DIR/env.sh"
}

alive() {  # alive PID COMMAND: the process still runs COMMAND
  [ -r "/proc/$1/cmdline" ] && [ "$(tr '\0' '\n' < "/proc/$1/cmdline" | head -n 1)" = "$2" ]
}

down() {
  [ -s "$DIR/pids" ] || { echo "slurm_local.sh: nothing started in $DIR"; return 0; }
  export SLURM_CONF=$DIR/slurm.conf
  if scontrol ping > /dev/null 2>&1; then
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 60); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  local pid name cmd
  tac "$DIR/pids" | while read -r pid name cmd; do
    alive "$pid" "$cmd" || continue
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 80); do alive "$pid" "$cmd" || break; sleep 0.25; done
    if alive "$pid" "$cmd"; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
  : > "$DIR/pids"
  echo "slurm_local.sh: cluster in $DIR stopped"
}

case "$ACTION" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down [DIR]" >&2; exit 2 ;;
esac
