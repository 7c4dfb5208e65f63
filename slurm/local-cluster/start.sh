#!/usr/bin/env bash
# A real SLURM cluster of NODES simulated nodes on this one machine, for the tests marked `slurm`.
#
#   slurm/local-cluster/start.sh     # idempotent: starts what is not running, ~20 s from nothing
#   slurm/local-cluster/stop.sh      # stops exactly the daemons this script started
#
# Debian 12 (SLURM 22.05), as root, no systemd: munged, MariaDB + slurmdbd (so that `sacct`,
# which submitit reads job states from, works), slurmctld, and one `slurmd -N nodeK` per node,
# all on 127.0.0.1 with ports of their own. Every daemon started here writes a pid file under
# $BASE/run, and only those are stopped by stop.sh. Settings (environment):
#   NODES=2                        simulated nodes node1..nodeN (node names go into /etc/hosts)
#   MMSCALE_SLURM_BASE=/tmp/mmscale-slurm   state, logs, pid files and the database
#   CPUS_PER_NODE=$(nproc)         CPUs each simulated node offers (they share the real cores)
# Timing settings differ from a production cluster on purpose: a requeued job starts again in
# seconds (AuthInfo cred_expire, fast scheduler passes), and KillWait leaves a stopping trainer
# 10 s between SIGTERM and SIGKILL to finish its step and save a tiny checkpoint.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
NODES="${NODES:-2}"
BASE="${MMSCALE_SLURM_BASE:-/tmp/mmscale-slurm}"
CPUS="${CPUS_PER_NODE:-$(nproc)}"
CLUSTER=mmscale
PARTITION=debug
DB_PORT=3307
HOST="$(hostname -s)"
RUN="$BASE/run" LOG="$BASE/log"
CONF=/etc/slurm/slurm.conf DBD_CONF=/etc/slurm/slurmdbd.conf
MARK="# managed-by: mmscale slurm/local-cluster/start.sh"
T0=$(date +%s.%N)

say() { printf '[%6.2fs] %s\n' "$(awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN{print a-b}')" "$*"; }
fail() { echo "start.sh: $*" >&2; exit 1; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() { # wait_for SECONDS COMMAND...: until COMMAND succeeds, or fail after SECONDS
  local end=$(($(date +%s) + $1)); shift
  until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -ge "$end" ] && return 1; sleep 0.2; done
}

check_prerequisites() {
  [ "$(id -u)" = 0 ] || fail "run as root (it writes /etc/slurm and /etc/hosts and starts daemons)"
  bash "$HERE/install.sh"
  command -v slurmctld >/dev/null || fail "slurmctld is not installed (see the message of install.sh above)"
  if [ -f "$CONF" ] && ! grep -q "$MARK" "$CONF"; then
    fail "$CONF exists and was not written by this script; this machine has a SLURM configuration of its own"
  fi
}

slurm_conf() {
  local mem=$(($(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 8 / 10 / NODES))
  cat <<EOF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again cred_expire + 1 s after it ended (default 120 s).
AuthInfo=cred_expire=5
SlurmctldPort=6817
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=10
InactiveLimit=0
JobRequeue=1
# The simulated nodes declare the machine's cores each; without this slurmd refuses that.
SlurmdParameters=config_overrides
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
NodeName=node[1-$NODES] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[17001-$((17000 + NODES))] CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

write_config() {
  mkdir -p "$BASE/state/ctld" "$RUN" "$LOG"
  for i in $(seq 1 "$NODES"); do mkdir -p "$BASE/state/d/node$i"; done
  local new
  new=$(mktemp)
  slurm_conf > "$new"
  if ! cmp -s "$new" "$CONF"; then
    if alive "$RUN/slurmctld.pid"; then say "configuration changed: restarting the cluster"; bash "$HERE/stop.sh"; fi
    # The node layout may have changed: start from a clean controller state, and a clean accounting
    # database with it, since job ids start again at 1 and sacct would mix in the old jobs' records.
    rm -rf "$BASE/state/ctld"/* "$BASE/mysql"
    install -D -m 644 "$new" "$CONF"
  fi
  rm -f "$new"
  # Jobs read MASTER_ADDR from the node list (node1), so node names must resolve.
  for i in $(seq 1 "$NODES"); do
    getent hosts "node$i" >/dev/null || echo "127.0.0.1 node$i  $MARK" >> /etc/hosts
  done
  say "configuration: $CONF ($NODES nodes x $CPUS CPUs)"
}

start_munge() {
  (munge -n | unmunge) >/dev/null 2>&1 && { say "munge already running"; return; }
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 755 /run/munge
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  cp /run/munge/munged.pid "$RUN/munged.pid" # ours to stop
  wait_for 10 sh -c 'munge -n | unmunge' || fail "munged did not start"
  say "munged started"
}

start_mariadb() {
  local db="$BASE/mysql" sock="$RUN/mysqld.sock"
  alive "$RUN/mariadb.pid" && return
  if [ ! -d "$db/mysql" ]; then
    install -d -o mysql -g mysql "$db"
    mariadb-install-db --no-defaults --user=mysql --datadir="$db" --auth-root-authentication-method=socket \
      > "$LOG/mariadb-install.log" 2>&1 || fail "mariadb-install-db failed: $LOG/mariadb-install.log"
  fi
  chown mysql:mysql "$RUN" && chmod 755 "$RUN"
  setsid mariadbd --no-defaults --user=mysql --datadir="$db" --socket="$sock" --port="$DB_PORT" \
    --bind-address=127.0.0.1 --pid-file="$RUN/mariadb.pid" --log-error="$LOG/mariadb.log" \
    --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 < /dev/null > /dev/null 2>&1 &
  wait_for 60 mariadb-admin --socket="$sock" ping || fail "mariadb did not start: $LOG/mariadb.log"
  mariadb --socket="$sock" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  say "mariadb started"
}

start_slurmdbd() {
  local new
  new=$(mktemp)
  cat > "$new" <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  install -m 600 "$new" "$DBD_CONF" && rm -f "$new"
  alive "$RUN/slurmdbd.pid" && return
  slurmdbd
  wait_for 30 bash -c 'exec 3<>/dev/tcp/127.0.0.1/6819' || fail "slurmdbd did not start: $LOG/slurmdbd.log"
  say "slurmdbd started"
}

all_idle() {
  [ "$(sinfo -h -N -o '%N' | sort -u | wc -l)" = "$NODES" ] && [ "$(sinfo -h -N -o '%T' | sort -u | tr -d '\n')" = idle ]
}

start_slurm() {
  alive "$RUN/slurmctld.pid" || slurmctld
  wait_for 30 scontrol ping || fail "slurmctld did not start: $LOG/slurmctld.log"
  for i in $(seq 1 "$NODES"); do alive "$RUN/slurmd-node$i.pid" || slurmd -N "node$i"; done
  if ! wait_for 60 all_idle; then
    # Nodes an earlier run left DOWN or DRAINED (a killed slurmd, a failed job) come back here.
    scontrol update NodeName="node[1-$NODES]" State=RESUME 2> /dev/null || true
    wait_for 30 all_idle || { sinfo -N -l; fail "nodes are not idle; see $LOG/slurmd-node*.log"; }
  fi
  say "cluster up:"
  sinfo -N
}

check_prerequisites
write_config
start_munge
start_mariadb
start_slurmdbd
start_slurm
