#!/usr/bin/env bash
# Stop the local one-node SLURM cluster started by scripts/slurm_local.sh:
# slurmd, slurmctld, slurmdbd, MariaDB, munged (in that order), each via its pid file.
# State (job ids, accounting DB, configs) is kept; slurm_local.sh brings it back.
#
#   bash scripts/slurm_stop.sh                 # stop daemons (running jobs' slurmstepd survive)
#   bash scripts/slurm_stop.sh --cancel-jobs   # scancel every job first
set -uo pipefail

RUN_DIR=/run/slurm
say() { echo "[slurm_stop] $*"; }

if [[ ${1:-} == --cancel-jobs ]] && command -v scancel >/dev/null; then
    ids=$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [[ -n ${ids// /} ]]; then
        say "cancelling jobs: $ids"
        # shellcheck disable=SC2086
        timeout 10 scancel $ids || true
        sleep 2
    fi
fi

# stop NAME PIDFILE COMM : SIGTERM the pid in PIDFILE if it is COMM, wait up to 20 s, then SIGKILL
stop() {
    local name=$1 pidfile=$2 comm=$3 pid
    if [[ ! -r $pidfile ]]; then say "$name: not running (no $pidfile)"; return 0; fi
    pid=$(tr -dc '0-9' <"$pidfile")
    if [[ -z $pid || ! -d /proc/$pid || $(cat "/proc/$pid/comm" 2>/dev/null) != "$comm" ]]; then
        say "$name: not running (stale $pidfile)"; rm -f "$pidfile"; return 0
    fi
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 80); do
        if [[ ! -d /proc/$pid ]]; then say "$name: stopped (pid $pid)"; rm -f "$pidfile"; return 0; fi
        sleep 0.25
    done
    say "$name: still alive after 20 s, killing pid $pid"
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

stop slurmd    "$RUN_DIR/slurmd.pid"     slurmd
stop slurmctld "$RUN_DIR/slurmctld.pid"  slurmctld
stop slurmdbd  "$RUN_DIR/slurmdbd.pid"   slurmdbd
stop mariadb   /run/mysqld/mysqld.pid    mariadbd
stop munged    /run/munge/munged.pid     munged
