#!/usr/bin/env bash
# Bring up a real one-node SLURM cluster (slurmctld + slurmd + slurmdbd + MariaDB + munge) on
# localhost, for integration tests.  Debian 12, run as root, no systemd needed.  Idempotent: a
# second run only verifies (and starts whatever is not running).
#
#   bash scripts/slurm_local.sh          # install (if needed) + configure + start + verify
#   bash scripts/slurm_stop.sh           # stop everything again
#
# Environment knobs:
#   SLURM_LOCAL_LOG_DIR   where the daemons log            (default /var/log/slurm)
#   SLURM_LOCAL_WAIT_S    how long to wait for each daemon (default 60)
#   SLURM_LOCAL_NO_INSTALL=1  never call apt-get (fail if packages are missing)
#   SLURM_LOCAL_CRED_EXPIRE_S   AuthInfo cred_expire = delay before a requeued job restarts (20)
#   SLURM_LOCAL_SCHED_INTERVAL_S  main + backfill scheduler interval (2)
set -euo pipefail

CLUSTER=tinyablate
PARTITION=debug
NODE=localhost
LOG_DIR=${SLURM_LOCAL_LOG_DIR:-/var/log/slurm}
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}
CRED_EXPIRE_S=${SLURM_LOCAL_CRED_EXPIRE_S:-20}
SCHED_INTERVAL_S=${SLURM_LOCAL_SCHED_INTERVAL_S:-2}
CONF_DIR=/etc/slurm
STATE_DIR=/var/lib/slurm
RUN_DIR=/run/slurm
DB_NAME=slurm_acct_db
DB_USER=slurm
MYSQL_SOCK=/run/mysqld/mysqld.sock
PACKAGES=(slurmctld slurmd slurmdbd munge mariadb-server slurm-client)

t_start=$(date +%s.%N)
t_last=$t_start
say() { echo "[slurm_local] $*"; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
phase_done() { say "$1 done in $(elapsed "$t_last") s"; t_last=$(date +%s.%N); }

die() {
    echo "[slurm_local] ERROR: $*" >&2
    for f in "$LOG_DIR"/munged.log "$LOG_DIR"/mariadb.log "$LOG_DIR"/slurmdbd.log \
             "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd.log; do
        [[ -s $f ]] || continue
        echo "----- tail -n 25 $f -----" >&2
        tail -n 25 "$f" >&2 || true
    done
    exit 1
}

# wait_for SECONDS DESCRIPTION CMD...  : poll CMD every 0.25 s until it succeeds
wait_for() {
    local limit=$1 what=$2; shift 2
    local deadline=$(( $(date +%s) + limit ))
    until "$@" >/dev/null 2>&1; do
        (( $(date +%s) < deadline )) || die "timed out after ${limit}s waiting for $what"
        sleep 0.25
    done
}

# pid_alive PIDFILE NAME : the pid in PIDFILE exists and is the process NAME
pid_alive() {
    local pidfile=$1 name=$2 pid
    [[ -r $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid ]] && [[ -d /proc/$pid ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]
}

[[ $(id -u) -eq 0 ]] || die "must run as root"

# ---------------------------------------------------------------- 1. packages
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if (( ${#missing[@]} )); then
    [[ ${SLURM_LOCAL_NO_INSTALL:-0} == 1 ]] && die "missing packages: ${missing[*]}"
    say "installing: ${missing[*]}"
    # Stop the maintainer scripts from starting daemons (no systemd here, and we start them
    # ourselves with our own configuration). Only add the policy if none exists.
    own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    rc=0
    {
        apt-get update -qq &&
        apt-get install -y -qq --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${PACKAGES[@]}"
    } >"/tmp/slurm_local_apt.log" 2>&1 || rc=$?
    (( own_policy )) && rm -f /usr/sbin/policy-rc.d
    if (( rc )); then
        tail -n 40 /tmp/slurm_local_apt.log >&2
        die "apt-get failed (rc=$rc), full log in /tmp/slurm_local_apt.log"
    fi
    phase_done "install"
else
    say "packages already installed"
fi

mkdir -p "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" "$RUN_DIR" "$CONF_DIR"

# ---------------------------------------------------------------- 2. munge
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating munge key"
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged --log-file="/var/log/munge/munged.log" \
        || die "munged failed to start (see /var/log/munge/munged.log)"
    ln -sf /var/log/munge/munged.log "$LOG_DIR/munged.log"
    wait_for 15 "munged" bash -c 'munge -n | unmunge'
fi
phase_done "munge"

# ---------------------------------------------------------------- 3. MariaDB
mysql_up() { mariadb-admin --socket="$MYSQL_SOCK" --silent ping; }
if ! mysql_up >/dev/null 2>&1; then
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        say "initialising MariaDB data dir"
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$LOG_DIR/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed (see $LOG_DIR/mariadb-install.log)"
    fi
    say "starting mariadbd"
    # Values slurmdbd recommends (it only warns otherwise); a small buffer pool is plenty here.
    setsid nohup /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket="$MYSQL_SOCK" \
        --pid-file=/run/mysqld/mysqld.pid --log-error="$LOG_DIR/mariadb.log" \
        --innodb-buffer-pool-size=256M --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 \
        --max-allowed-packet=64M </dev/null >>"$LOG_DIR/mariadb.log" 2>&1 &
    wait_for "$WAIT_S" "MariaDB socket $MYSQL_SOCK" mysql_up
fi
# The accounting DB password lives only in slurmdbd.conf (mode 600); reuse it across runs.
DB_PASS=$(sed -n 's/^StoragePass=//p' "$CONF_DIR/slurmdbd.conf" 2>/dev/null || true)
[[ -n $DB_PASS ]] || DB_PASS=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
mariadb --socket="$MYSQL_SOCK" -uroot <<SQL || die "could not create the accounting database/user"
CREATE DATABASE IF NOT EXISTS ${DB_NAME};
CREATE USER IF NOT EXISTS '${DB_USER}'@'localhost' IDENTIFIED BY '${DB_PASS}';
ALTER USER '${DB_USER}'@'localhost' IDENTIFIED BY '${DB_PASS}';
GRANT ALL PRIVILEGES ON ${DB_NAME}.* TO '${DB_USER}'@'localhost';
FLUSH PRIVILEGES;
SQL
phase_done "mariadb"

# ---------------------------------------------------------------- 4. configuration
# Node hardware as slurmd itself sees it (so the node never drains for a mismatch).
hw=$(slurmd -C 2>/dev/null | head -n 1) || die "slurmd -C failed"
get_hw() { sed -n "s/.*[[:space:]]$1=\([0-9]*\).*/\1/p" <<<"$hw"; }
CPUS=$(get_hw CPUs); BOARDS=$(get_hw Boards); SPB=$(get_hw SocketsPerBoard)
CPS=$(get_hw CoresPerSocket); TPC=$(get_hw ThreadsPerCore); MEM=$(get_hw RealMemory)
[[ -n $CPUS && -n $MEM ]] || die "could not parse 'slurmd -C': $hw"
# Declare a little less memory than reported: a node declaring more than slurmd later
# measures gets drained ("Low RealMemory").
MEM=$(( MEM * 97 / 100 ))
DEF_MEM_PER_CPU=$(( MEM / CPUS ))

new_conf=$(mktemp)
cat >"$new_conf" <<EOF
# Generated by tinyablate scripts/slurm_local.sh -- one-node test cluster on localhost.
ClusterName=${CLUSTER}
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=${STATE_DIR}/slurmctld
SlurmdSpoolDir=${STATE_DIR}/slurmd
SlurmctldPidFile=${RUN_DIR}/slurmctld.pid
SlurmdPidFile=${RUN_DIR}/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: plain /proc based process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
SchedulerType=sched/backfill
# Test-cluster responsiveness: schedule every few seconds instead of every 30-60 s.
SchedulerParameters=sched_interval=${SCHED_INTERVAL_S},bf_interval=${SCHED_INTERVAL_S}
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=${CRED_EXPIRE_S}
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=${DEF_MEM_PER_CPU}
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=10
InactiveLimit=0
MinJobAge=300
SlurmctldTimeout=120
SlurmdTimeout=300
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} Boards=${BOARDS:-1} SocketsPerBoard=${SPB:-1} CoresPerSocket=${CPS:-$CPUS} ThreadsPerCore=${TPC:-1} RealMemory=${MEM} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF
conf_changed=0
if ! cmp -s "$new_conf" "$CONF_DIR/slurm.conf"; then
    install -m 644 "$new_conf" "$CONF_DIR/slurm.conf"
    conf_changed=1
fi
rm -f "$new_conf"

new_dbd=$(mktemp)
cat >"$new_dbd" <<EOF
# Generated by tinyablate scripts/slurm_local.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=${LOG_DIR}/slurmdbd.log
PidFile=${RUN_DIR}/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=${DB_USER}
StoragePass=${DB_PASS}
StorageLoc=${DB_NAME}
EOF
dbd_changed=0
if ! cmp -s "$new_dbd" "$CONF_DIR/slurmdbd.conf"; then
    install -m 600 -o root -g root "$new_dbd" "$CONF_DIR/slurmdbd.conf"
    dbd_changed=1
fi
rm -f "$new_dbd"
chmod 600 "$CONF_DIR/slurmdbd.conf"
phase_done "config (slurm.conf changed=$conf_changed, slurmdbd.conf changed=$dbd_changed)"

# stop_daemon NAME : stop a slurm daemon via its pidfile (used only when its config changed)
stop_daemon() {
    local name=$1 pidfile=$RUN_DIR/$1.pid pid
    pid_alive "$pidfile" "$name" || return 0
    pid=$(tr -dc '0-9' <"$pidfile")
    say "restarting $name (config changed)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 80); do [[ -d /proc/$pid ]] || return 0; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------- 5. slurmdbd + cluster
(( dbd_changed )) && stop_daemon slurmdbd
if ! pid_alive "$RUN_DIR/slurmdbd.pid" slurmdbd; then
    say "starting slurmdbd"
    slurmdbd || die "slurmdbd failed to start"
fi
wait_for "$WAIT_S" "slurmdbd (sacctmgr show cluster)" sacctmgr -n show cluster
if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    say "registering cluster $CLUSTER"
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster failed"
fi
# 'add cluster' creates the root account and the root user association; make sure of it.
if ! sacctmgr -n -P show assoc cluster="$CLUSTER" user=root format=user | grep -qx root; then
    sacctmgr -i add user root account=root cluster="$CLUSTER" >/dev/null || true
fi
phase_done "slurmdbd"

# ---------------------------------------------------------------- 6. slurmctld + slurmd
if (( conf_changed )); then stop_daemon slurmd; stop_daemon slurmctld; fi
if ! pid_alive "$RUN_DIR/slurmctld.pid" slurmctld; then
    say "starting slurmctld"
    slurmctld || die "slurmctld failed to start"
fi
wait_for "$WAIT_S" "slurmctld (scontrol ping)" bash -c 'scontrol ping | grep -q "is UP"'
if ! pid_alive "$RUN_DIR/slurmd.pid" slurmd; then
    say "starting slurmd"
    # -N: our node is called 'localhost' whatever the machine's hostname is.
    slurmd -N "$NODE" || die "slurmd failed to start"
fi

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1; }
deadline=$(( $(date +%s) + WAIT_S )); resumed=0
while :; do
    st=$(node_state || true)
    case $st in
        idle|mixed|allocated|completing) break ;;
        *drain*|down*|fail*)
            if (( ! resumed )); then
                say "node is '$st', resuming it"
                scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
                resumed=1
            fi ;;
    esac
    if (( $(date +%s) >= deadline )); then
        scontrol show node "$NODE" >&2 || true
        die "node $NODE not idle after ${WAIT_S}s (state '${st:-?}')"
    fi
    sleep 0.25
done
sacct -n -X -S now-1minute >/dev/null 2>&1 || die "sacct does not work"
phase_done "slurmctld+slurmd"

say "cluster '$CLUSTER' up: node $NODE is $st, CPUs=$CPUS RealMemory=${MEM}M, partition $PARTITION"
say "logs in $LOG_DIR; total $(elapsed "$t_start") s"
