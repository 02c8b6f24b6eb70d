#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the cluster tests (tests/test_slurm.py) and CI.
#
#   scripts/start_slurm_localhost.sh start [STATE_DIR]   # prints "export SLURM_CONF=..." on stdout
#   scripts/start_slurm_localhost.sh stop  [STATE_DIR]
#   scripts/start_slurm_localhost.sh status [STATE_DIR]
#
#   eval "$(scripts/start_slurm_localhost.sh start)"    # then sbatch/squeue/sinfo use it
#
# STATE_DIR (default: $BIDS_QSMNET_SLURM_DIR or /tmp/bids_qsmnet_slurm) holds slurm.conf, the
# controller state, the spool, the logs and the pid files; nothing is written to /etc/slurm.
# Needs root (munged runs as the "munge" user, slurmd launches jobs) and the Debian packages
# slurm-wlm and munge (apt-get install -y --no-install-recommends slurm-wlm munge).
# No accounting (sacct needs slurmdbd):
# inspect jobs with "scontrol show job ID" (kept for MinJobAge = 300 s) or "sbatch --wait".
set -euo pipefail

action="${1:-start}"
state="${2:-${BIDS_QSMNET_SLURM_DIR:-/tmp/bids_qsmnet_slurm}}"
conf="$state/slurm.conf"
export SLURM_CONF="$conf"

log() { echo "start_slurm_localhost: $*" >&2; }

# stop a daemon by the pid in its pid file, wait up to 10 s for it to exit
stop_pidfile() {
    local pidfile="$1" pid
    [[ -f "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid ($pidfile) did not exit after SIGTERM; sending SIGKILL"
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

node_state() { sinfo -h -n localhost -o %T 2>/dev/null | head -n1; }

case "$action" in
start)
    for exe in munged munge unmunge slurmctld slurmd sinfo; do
        command -v "$exe" >/dev/null || {
            log "$exe not found: apt-get install -y --no-install-recommends slurm-wlm munge"
            exit 1
        }
    done
    [[ "$(id -u)" == 0 ]] || { log "must run as root (munged and slurmd)"; exit 1; }
    if [[ -f "$state/slurmctld.pid" ]] && kill -0 "$(cat "$state/slurmctld.pid")" 2>/dev/null
    then
        log "already running (state in $state)"
        echo "export SLURM_CONF=$conf"
        exit 0
    fi
    mkdir -p "$state/state" "$state/spool"
    # munge: Debian's package makes /etc/munge/munge.key; without systemd /run/munge is missing
    if munge_ok; then
        log "munged already running; using it"
    else
        [[ -f /etc/munge/munge.key ]] || { log "no /etc/munge/munge.key"; exit 1; }
        install -d -o munge -g munge -m 0755 /run/munge
        runuser -u munge -- munged
        for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
        munge_ok || { log "munged did not start"; exit 1; }
        # ours to stop on "stop" (an already running munged is left alone)
        cp /run/munge/munged.pid "$state/munged.pid"
    fi
    cpus="$(nproc)"
    # RealMemory as slurmd measures it, so the node is not drained for "low RealMemory"
    mem="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)"
    cat >"$conf" <<EOF
# one-node cluster written by scripts/start_slurm_localhost.sh
ClusterName=localhost
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
SlurmctldPort=${BIDS_QSMNET_SLURMCTLD_PORT:-6817}
SlurmdPort=${BIDS_QSMNET_SLURMD_PORT:-6818}
StateSaveLocation=$state/state
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=300
NodeName=localhost CPUs=$cpus RealMemory=${mem:-1000} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    slurmctld -f "$conf"
    slurmd -f "$conf" -N localhost
    for _ in $(seq 100); do
        case "$(node_state)" in idle*|mix*|alloc*) break ;; esac
        sleep 0.2
    done
    st="$(node_state)"
    case "$st" in
    idle*|mix*|alloc*) log "node localhost $st (state in $state)" ;;
    *) log "node not ready (state '${st:-unknown}'); see $state/slurmctld.log, $state/slurmd.log"
       exit 1 ;;
    esac
    echo "export SLURM_CONF=$conf"
    ;;
stop)
    stop_pidfile "$state/slurmd.pid"
    stop_pidfile "$state/slurmctld.pid"
    stop_pidfile "$state/munged.pid"  # only when this script started munged
    log "stopped (state left in $state)"
    ;;
status)
    [[ -f "$conf" ]] || { log "not started (no $conf)"; exit 1; }
    sinfo
    ;;
*)
    log "usage: $0 {start|stop|status} [STATE_DIR]"
    exit 2
    ;;
esac
