#!/usr/bin/env bash
# Set up (or check) a one-node SLURM cluster on this machine, for tests and for trying the sbatch templates.
#
#   sudo bash slurm/setup_local_cluster.sh          # install + configure + start; safe to run again
#   bash slurm/setup_local_cluster.sh --stop        # stop the daemons this script started
#
# What it does (each step prints a line):
#   1. installs Debian's slurm-wlm (slurmctld, slurmd, client tools) and munge with apt, if missing;
#   2. creates a munge key if there is none and starts munged;
#   3. writes /etc/slurm/slurm.conf for one node with this machine's CPUs and memory (from `slurmd -C`);
#      no accounting database (sacct is not needed), proctrack/linuxproc + task/none (no cgroups, no systemd),
#      select/cons_tres, a `debug` partition with GraceTime=0 so preemption/requeue tests are immediate;
#   4. starts slurmctld and slurmd by hand (no systemd) and waits until `sinfo` shows the node idle.
# Running it again with nothing changed only checks that the cluster answers. It needs root (apt, daemons).
# Environment knobs: SLURM_LOCAL_KILLWAIT (seconds between SIGTERM and SIGKILL when a job is cancelled or
# requeued; default 60: the trainer needs that long to save a checkpoint), SLURM_LOCAL_WAIT (seconds to wait
# for the node to become idle; default 90).
set -euo pipefail

say() { echo "[setup_local_cluster] $*"; }
die() { echo "[setup_local_cluster] ERROR: $*" >&2; exit 1; }

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
STATE_DIR=/var/lib/slurm
LOG_DIR=/var/log/slurm
KILLWAIT="${SLURM_LOCAL_KILLWAIT:-60}"
WAIT_S="${SLURM_LOCAL_WAIT:-90}"

if [[ "$(id -u)" -ne 0 ]]; then
    die "must run as root (it installs packages and starts daemons): sudo bash $0"
fi

pid_alive() {  # pid_alive PIDFILE -> 0 if the pid in that file is a running process
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop_daemon() {  # stop_daemon NAME PIDFILE: TERM the pid recorded in its pid file, wait until it is gone
    local name="$1" pidfile="$2" pid
    if pid_alive "$pidfile"; then
        pid="$(cat "$pidfile")"
        say "stopping $name (pid $pid)"
        kill "$pid"
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "$pidfile"
}

if [[ "${1:-}" == "--stop" ]]; then
    stop_daemon slurmd /run/slurmd.pid
    stop_daemon slurmctld /run/slurmctld.pid
    stop_daemon munged /run/munge/munged.pid
    exit 0
fi

# ---- 1. packages -------------------------------------------------------------------------------------
missing=()
for tool in slurmctld slurmd sinfo sbatch munged; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if (( ${#missing[@]} )); then
    say "installing slurm-wlm and munge with apt-get (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends slurm-wlm munge
else
    say "slurm and munge already installed ($(sinfo --version))"
fi

# ---- 2. munge ----------------------------------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    mungekey --create --keyfile /etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if pid_alive /run/munge/munged.pid; then
    say "munged already running"
else
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
fi
munge -n | unmunge >/dev/null || die "munge does not round-trip a credential; see /var/log/munge/munged.log"

# ---- 3. slurm.conf -----------------------------------------------------------------------------------
node="$(hostname -s)"
# `slurmd -C` prints this machine's node line (CPUs, sockets, cores, threads, RealMemory) as slurmd sees it.
node_hw="$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]* //')"
[[ "$node_hw" == *CPUs=* ]] || die "could not read this machine's CPUs/memory from 'slurmd -C'"
install -d -m 0755 "$CONF_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" "$LOG_DIR"
new_conf="$(mktemp)"
cat >"$new_conf" <<EOF
# Written by slurm/setup_local_cluster.sh: a one-node cluster for tests. Edit that script, not this file.
ClusterName=localcluster
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=${STATE_DIR}/slurmctld
SlurmdSpoolDir=${STATE_DIR}/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
# No cgroups and no systemd here: track processes through /proc and do no CPU binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# No accounting database: sacct is not available, squeue/scontrol are.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Batch jobs may be requeued (scontrol requeue, preemption); keep finished jobs visible for 5 minutes.
JobRequeue=1
MinJobAge=300
# Seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or preempted: time to save a checkpoint.
KillWait=${KILLWAIT}
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
NodeName=${node} NodeAddr=127.0.0.1 ${node_hw} State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP GraceTime=0 OverSubscribe=NO
EOF

restart=0
if [[ -f "$CONF" ]] && cmp -s "$new_conf" "$CONF"; then
    say "$CONF is up to date"
    rm -f "$new_conf"
else
    say "writing $CONF (node ${node}: ${node_hw})"
    mv "$new_conf" "$CONF"
    chmod 0644 "$CONF"
    restart=1
fi

# ---- 4. daemons --------------------------------------------------------------------------------------
if (( restart )); then
    stop_daemon slurmd /run/slurmd.pid
    stop_daemon slurmctld /run/slurmctld.pid
fi
if pid_alive /run/slurmctld.pid; then
    say "slurmctld already running"
else
    say "starting slurmctld (log: $LOG_DIR/slurmctld.log)"
    # -c: start with a clean state; jobs of an earlier instance of this test cluster are not kept.
    slurmctld -c
fi
if pid_alive /run/slurmd.pid; then
    say "slurmd already running"
else
    say "starting slurmd (log: $LOG_DIR/slurmd.log)"
    slurmd
fi

say "waiting up to ${WAIT_S}s for node ${node} to be idle"
deadline=$(( SECONDS + WAIT_S ))
while true; do
    state="$(sinfo -h -n "$node" -o %T 2>/dev/null | head -n 1 || true)"
    case "$state" in
        idle|mixed|allocated) break ;;
        down*|drain*)
            say "node is '$state'; resuming it"
            scontrol update nodename="$node" state=resume || true ;;
    esac
    if (( SECONDS >= deadline )); then
        die "node ${node} is '${state:-unknown}' after ${WAIT_S}s; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
    fi
    sleep 1
done
say "cluster ready:"
sinfo
