#!/usr/bin/env bash
# A real SLURM cluster of emulated nodes (n1, n2, ...) on this one machine, for tests.
#
#   tests/slurm/cluster.sh start    # install if needed, start, wait until every node is idle
#   eval "$(tests/slurm/cluster.sh start)"   # ... and export SLURM_CONF in the caller
#   tests/slurm/cluster.sh status   # exit 0 iff every node is idle
#   tests/slurm/cluster.sh stop     # stop the daemons this script started
#
# Everything (config, keys, sockets, spool, logs, pid files) lives in
# ${SULIS_SLURM_DIR:-/tmp/sulis-slurm}; nothing under /etc is touched, so the
# caller must use SLURM_CONF (printed by `start`) for sinfo/sbatch/srun/...
#
# Its size: SULIS_SLURM_NODES nodes (default 3) of SULIS_SLURM_CPUS CPUs
# (default 4) and SULIS_SLURM_MEMORY MB (default 6000) each. A machine with
# 2 cores can declare 16 x 8 or 1 x 128 (see SlurmdParameters below): the
# scale benchmark (benchmarks/scale.py) starts such clusters beside the
# tests' own, each in a directory of its own, with ports of its own
# (SULIS_SLURMCTLD_PORT, SULIS_SLURMD_PORT: the first node's; the others
# follow).
#
# `start` also prints `export SULIS_SLURM_STARTED=1` when it started the
# daemons (rather than finding them running), so that its caller knows to
# stop them when done, and to leave alone a cluster it did not start.
#
# Needs root: slurmd must be able to become the submitting user, and munged
# must run as the `munge` user.  Tested with Debian 12 (SLURM 22.05, munge 0.5.15).
#
# Only stdout of `start` is meant for eval; all diagnostics go to stderr.
#
# Gotchas seen (SLURM 22.05 / Debian 12):
# - MPI: `srun --mpi=pmi2` works with the PyPI mpich wheel (+ mpi4py) as is;
#   without --mpi=pmi2 (MpiDefault=none) every rank is a singleton of size 1.
#   --mpi=pmix is unusable (no libpmix); slurmd logs "can not load PMIx
#   library" at start-up -- harmless.
# - All nodes share one host name, so `hostname` in a task prints the same
#   thing everywhere; use SLURMD_NODENAME (n1..n3) to tell nodes apart.
# - The first job after a cold start waits ~3 s for the scheduler's first
#   pass, and `sbatch --wait` polls with a growing interval, so it can return
#   several seconds after the job ended; poll `scontrol show job` if it matters.
# - `sinfo` against a dead controller retries for ~10 s, hence the pid-file
#   checks before calling it.
set -euo pipefail

STATE_DIR=${SULIS_SLURM_DIR:-/tmp/sulis-slurm}
CONF=$STATE_DIR/slurm.conf
MUNGE_DIR=$STATE_DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
NODE_COUNT=${SULIS_SLURM_NODES:-3}
NODE_CPUS=${SULIS_SLURM_CPUS:-4}
NODE_MEMORY=${SULIS_SLURM_MEMORY:-6000}
NODES=()
for ((i = 1; i <= NODE_COUNT; i++)); do NODES+=("n$i"); done
# Fixed but unusual ports so we don't clash with a system SLURM (6817/6818).
CTLD_PORT=${SULIS_SLURMCTLD_PORT:-16817}
SLURMD_PORT=${SULIS_SLURMD_PORT:-17001}
START_TIMEOUT=${SULIS_SLURM_START_TIMEOUT:-60}

log() { echo "cluster.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Poll `cmd` every 0.2 s until it succeeds or `secs` pass (no fixed sleeps).
wait_for() {
    local secs=$1; shift
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

daemons_alive() {
    local n
    [[ -f $CONF ]] || return 1
    pid_alive "$MUNGE_DIR/munged.pid" || return 1
    pid_alive "$STATE_DIR/slurmctld.pid" || return 1
    for n in "${NODES[@]}"; do pid_alive "$STATE_DIR/slurmd.$n.pid" || return 1; done
}

install_packages() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
    [[ $(id -u) == 0 ]] || die "slurm-wlm/munge missing and not root; install them first"
    log "installing slurm-wlm and munge (apt)"
    # The Debian packages try to start system services; in containers without
    # systemd that fails harmlessly, and we never use the system instances.
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >&2
}

all_idle() {
    # `sinfo -h -N -o '%N %t'` prints one line per node; "idle" only once slurmd
    # has registered and the node is usable (ReturnToService=2 clears "down").
    local n
    n=$(SLURM_CONF=$CONF sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2=="idle"' | wc -l)
    [[ $n -eq ${#NODES[@]} ]]
}

write_slurm_conf() {
    local host
    host=$(hostname -s)
    # Gotchas encoded here:
    # - ProctrackType=proctrack/linuxproc + TaskPlugin=task/none: cgroup plugins
    #   need a writable, delegated cgroup tree, which containers/CI VMs rarely give.
    # - SlurmdParameters=config_overrides: we claim CPUs=$NODE_CPUS and
    #   RealMemory=$NODE_MEMORY per node even on a 2-CPU box; without it slurmd sees fewer CPUs than
    #   configured and the node is drained ("Low socket*core*thread count").
    # - NodeHostname=<this host> for every node + distinct Port: that is
    #   what lets several slurmd (-N n1 ...) coexist on one machine. SLURM then
    #   reports SLURMD_NODENAME=n1..n3 while `hostname` is the same everywhere.
    # - SelectType=select/cons_tres + CR_CPU_Memory: memory is a consumable
    #   resource, so --mem/--mem-per-cpu are honoured and exported
    #   (SLURM_MEM_PER_CPU / SLURM_MEM_PER_NODE).
    # - No accounting (no slurmdbd): sacct doesn't work; MinJobAge=300 keeps
    #   finished jobs visible to `scontrol show job <id>` for 5 minutes.
    # - KillWait=5: scancel sends SIGTERM, then SIGKILL after KillWait seconds
    #   (default 30) -- keeps cancellation tests quick.
    # - MpiDefault=none: pass --mpi=pmi2 explicitly for MPI programs.
    #   mpi_pmi2.so ships with slurm-wlm-basic-plugins, nothing more is needed
    #   for MPICH (its PMI-2 client is built in, it talks to slurmstepd via
    #   PMI_FD, so no libpmi2 from SLURM is required).
    # - AuthInfo=socket=...: our private munged socket, not /run/munge.
    cat >"$CONF" <<EOF
# Generated by tests/slurm/cluster.sh -- do not edit, it is rewritten on start.
ClusterName=sulis-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE_DIR/ctld
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmdPidFile=$STATE_DIR/slurmd.%n.pid
SlurmdLogFile=$STATE_DIR/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
SlurmctldTimeout=30
KillWait=5
InactiveLimit=0
MinJobAge=300
Waittime=0
GresTypes=gpu
NodeName=n[1-$NODE_COUNT] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$SLURMD_PORT-$((SLURMD_PORT + NODE_COUNT - 1))] CPUs=$NODE_CPUS RealMemory=$NODE_MEMORY Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=n[1-$NODE_COUNT] Default=YES MaxTime=INFINITE State=UP
EOF
    # Two fake GPUs per node, so `--gres=gpu:N` jobs get real SLURM_JOB_GPUS /
    # CUDA_VISIBLE_DEVICES.  slurmd insists File= is a character or block
    # device ("not a valid character or block device" otherwise, and then
    # only SLURM_GPUS_ON_NODE is set); with task/none nothing constrains
    # devices, so symlinks to /dev/null stand in for /dev/nvidia0,1 (no mknod
    # needed, works in unprivileged containers). The index SLURM reports comes
    # from the trailing number of the name.  gres.conf is read from the
    # directory of SLURM_CONF.
    mkdir -p "$STATE_DIR/dev"
    ln -sfn /dev/null "$STATE_DIR/dev/gpu0"
    ln -sfn /dev/null "$STATE_DIR/dev/gpu1"
    cat >"$STATE_DIR/gres.conf" <<EOF
AutoDetect=off
NodeName=n[1-$NODE_COUNT] Name=gpu File=$STATE_DIR/dev/gpu[0-1]
EOF
}

start_munge() {
    if pid_alive "$MUNGE_DIR/munged.pid"; then return 0; fi
    mkdir -p "$MUNGE_DIR"
    # munged refuses keys/dirs that are group/world writable or not owned by
    # the user it runs as; the key must be exactly 0400 (or 0600).
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_DIR/munge.key" --force >&2
        else
            dd if=/dev/urandom bs=1 count=1024 of="$MUNGE_DIR/munge.key" status=none
        fi
    fi
    chown -R munge:munge "$MUNGE_DIR"
    # The socket dir must be executable by all (clients = every job user),
    # and writable only by munge.
    chmod 0755 "$MUNGE_DIR"
    chmod 0400 "$MUNGE_DIR/munge.key"
    # munged checks every directory up to / for the socket dir is not writable
    # by others (except with sticky bit). /tmp is 1777 (OK); the state dir is
    # made 0755 in start().  --force would skip checks; we keep them.
    runuser -u munge -- munged \
        --key-file="$MUNGE_DIR/munge.key" \
        --socket="$MUNGE_SOCKET" \
        --pid-file="$MUNGE_DIR/munged.pid" \
        --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" \
        || die "munged failed; see $MUNGE_DIR/munged.log"
    wait_for 10 bash -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'" \
        || die "munged not answering on $MUNGE_SOCKET"
}

start() {
    install_packages
    export SLURM_CONF=$CONF
    # Check pid files first: sinfo against a dead controller retries for ~10 s.
    if daemons_alive && all_idle; then
        log "already running"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    local t0=$SECONDS
    mkdir -p "$STATE_DIR"/{ctld,log,spool}
    chmod 0755 "$STATE_DIR"
    start_munge
    write_slurm_conf
    if ! pid_alive "$STATE_DIR/slurmctld.pid"; then
        # -i: ignore (possibly stale) saved state from a previous run; this
        # also means jobs from a previous cluster are forgotten.
        slurmctld -i || die "slurmctld failed; see $STATE_DIR/log/slurmctld.log"
    fi
    local n
    for n in "${NODES[@]}"; do
        pid_alive "$STATE_DIR/slurmd.$n.pid" && continue
        mkdir -p "$STATE_DIR/spool/$n"
        slurmd -N "$n" || die "slurmd -N $n failed; see $STATE_DIR/log/slurmd.$n.log"
    done
    if ! wait_for "$START_TIMEOUT" all_idle; then
        SLURM_CONF=$CONF sinfo -N -l >&2 || true
        die "nodes not idle after ${START_TIMEOUT}s; logs in $STATE_DIR/log"
    fi
    log "$NODE_COUNT nodes idle after $((SECONDS - t0))s"
    echo "export SLURM_CONF=$CONF"
    echo "export SULIS_SLURM_STARTED=1"
}

# Send SIGTERM to the daemons in the given pid files, wait for all of them
# (SIGKILL after 20 s). Each daemon takes ~1.5 s to shut down, so signalling
# them together rather than one by one keeps `stop` short.
stop_pidfiles() {
    local f pids=()
    for f in "$@"; do
        if pid_alive "$f"; then
            pids+=("$(cat "$f")")
            kill -TERM "${pids[-1]}" 2>/dev/null || true
        fi
    done
    local pid
    for pid in "${pids[@]}"; do
        if ! wait_for 20 bash -c "! kill -0 $pid"; then
            log "pid $pid ignored SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            wait_for 5 bash -c "! kill -0 $pid" || true
        fi
    done
    rm -f "$@"
}

stop() {
    # Every node's pid file, whatever size the cluster was started with.
    local slurmd_pidfiles=("$STATE_DIR"/slurmd.*.pid)
    [[ -e ${slurmd_pidfiles[0]} ]] || slurmd_pidfiles=()
    # slurmd first (they kill their job steps), then the controller, then munge
    # which both of them need while shutting down.
    stop_pidfiles "${slurmd_pidfiles[@]}"
    stop_pidfiles "$STATE_DIR/slurmctld.pid"
    stop_pidfiles "$MUNGE_DIR/munged.pid"
    log "stopped"
}

status() {
    daemons_alive || { log "not running (see pid files in $STATE_DIR)"; return 1; }
    if all_idle; then
        log "$NODE_COUNT nodes idle"
        return 0
    fi
    SLURM_CONF=$CONF sinfo -N 2>&1 >&2 || true
    return 1
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
