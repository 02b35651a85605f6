#!/usr/bin/env bash
# A real SLURM cluster of emulated nodes (n1, n2, ...) on this one machine, for tests.
#
#   tests/slurm/cluster.sh start    # install if needed, start, wait until every node is idle
#   eval "$(tests/slurm/cluster.sh start)"   # ... and export SLURM_CONF in the caller
#   tests/slurm/cluster.sh status   # exit 0 iff every node is idle
#   tests/slurm/cluster.sh stop     # stop the daemons this script started, remove its namespaces
#   tests/slurm/cluster.sh run CMD...        # run CMD (sbatch, squeue, srun...) in the login namespace
#   tests/slurm/cluster.sh link NODE down|up # cut / restore a node's link (a network partition)
#
# Every emulated node has a network of its own, as on a real cluster: each
# slurmd (and so everything its jobs start) runs in a network namespace of
# its own (`nsenter --net`), whose interface eth0 has the node's address on
# a private subnet (SULIS_SLURM_SUBNET, default 10.77.0, a /24):
#   slurmctld  .1       (namespace <prefix>-ctld)
#   login      .2       (namespace <prefix>-login: run every SLURM client
#                        command there, `cluster.sh run sbatch ...`; it stands
#                        for the login node: the root namespace has no address
#                        on this network)
#   nN         .(10+N)  (namespace <prefix>-nN)
# Each eth0 is one end of a veth pair; the other end (v-ctld, v-login, v-nN)
# is a port of the bridge br0, in one more namespace (<prefix>-switch). So a
# node's loopback is its own, Dask must bind the node's real interface
# (SULIS_EXECUTOR_INTERFACE=eth0, the same name on every node), and
# `cluster.sh link n2 down` (the switch's port of n2 down) is a real network
# partition. Nothing is added to the root namespace, and no traffic can leave
# the switch namespace. The prefix is derived from the state directory
# (sulis-<hash>), so clusters in different directories never share a name;
# `start` writes the names to $STATE_DIR/netns.env for the tests.
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
# - All nodes share one host name (the namespaces are network namespaces
#   only), so `hostname` in a task prints the same thing everywhere; use
#   SLURMD_NODENAME (n1..n3) to tell nodes apart. PIDs and files are shared
#   too: /proc/PID/... of any job process is readable from the root
#   namespace (and /proc/PID/net/* shows that process's network namespace).
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
# Network namespaces (see the top of this file).
NETNS_PREFIX=sulis-$(printf %s "$(realpath -m "$STATE_DIR")" | md5sum | cut -c1-8)
SWITCH_NS=$NETNS_PREFIX-switch
CTLD_NS=$NETNS_PREFIX-ctld
LOGIN_NS=$NETNS_PREFIX-login
SUBNET=${SULIS_SLURM_SUBNET:-10.77.0}
IFACE=eth0
CTLD_ADDR=$SUBNET.1
LOGIN_ADDR=$SUBNET.2
NETNS_ENV=$STATE_DIR/netns.env

log() { echo "cluster.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

((NODE_COUNT <= 200)) || die "at most 200 nodes (one /24)"
node_addr() { echo "$SUBNET.$((10 + ${1#n}))"; }

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
    network_present || return 1
    pid_alive "$MUNGE_DIR/munged.pid" || return 1
    pid_alive "$STATE_DIR/slurmctld.pid" || return 1
    for n in "${NODES[@]}"; do pid_alive "$STATE_DIR/slurmd.$n.pid" || return 1; done
}

ns_exists() { [[ -e /run/netns/$1 ]]; }

# in_ns NAMESPACE CMD...: CMD in that network namespace, and only there:
# `ip netns exec` would also give it a mount namespace with a /sys of its
# own, without /sys/fs/cgroup, which slurmd refuses ("Unable to initialize
# cgroup plugin").
in_ns() { local ns=$1; shift; nsenter --net="/run/netns/$ns" "$@"; }
# In the login namespace (the cluster's only client host).
in_login() { in_ns "$LOGIN_NS" "$@"; }

network_present() {
    local n
    [[ -f $NETNS_ENV ]] || return 1
    for n in "$SWITCH_NS" "$CTLD_NS" "$LOGIN_NS" "${NODES[@]/#/$NETNS_PREFIX-}"; do
        ns_exists "$n" || return 1
    done
}

# attach NAME NAMESPACE ADDRESS: NAMESPACE's eth0, with ADDRESS/24, is one end
# of a veth pair whose other end, v-NAME, is a port of the switch's bridge.
attach() {
    local name=$1 ns=$2 addr=$3
    ns_exists "$ns" || ip netns add "$ns"
    ip -n "$ns" link set lo up
    if ! ip -n "$ns" link show "$IFACE" >/dev/null 2>&1; then
        ip -n "$SWITCH_NS" link del "v-$name" >/dev/null 2>&1 || true
        ip -n "$SWITCH_NS" link add "v-$name" type veth peer name "$IFACE" netns "$ns"
    fi
    ip -n "$SWITCH_NS" link set "v-$name" master br0 up
    ip -n "$ns" addr replace "$addr/24" dev "$IFACE"
    ip -n "$ns" link set "$IFACE" up
    # A default route through eth0, as a node has, so that "the address of
    # the default route" (Dask's get_ip(), no interface named) is eth0's.
    # Nothing answers beyond the bridge: the switch namespace routes nowhere.
    ip -n "$ns" route replace default dev "$IFACE"
}

setup_network() {
    [[ $(id -u) == 0 ]] || die "network namespaces need root"
    command -v ip >/dev/null || die "the ip command (iproute2) is missing"
    ns_exists "$SWITCH_NS" || ip netns add "$SWITCH_NS"
    ip -n "$SWITCH_NS" link set lo up
    ip -n "$SWITCH_NS" link show br0 >/dev/null 2>&1 || ip -n "$SWITCH_NS" link add br0 type bridge
    ip -n "$SWITCH_NS" link set br0 up
    attach ctld "$CTLD_NS" "$CTLD_ADDR"
    attach login "$LOGIN_NS" "$LOGIN_ADDR"
    local n
    for n in "${NODES[@]}"; do attach "$n" "$NETNS_PREFIX-$n" "$(node_addr "$n")"; done
    cat >"$NETNS_ENV" <<EOF
# Written by tests/slurm/cluster.sh start: this cluster's network namespaces.
# Node nN is in namespace \$SULIS_SLURM_NETNS_PREFIX-nN, whose link is the
# port v-nN of the bridge in \$SULIS_SLURM_SWITCH_NETNS.
SULIS_SLURM_NETNS_PREFIX=$NETNS_PREFIX
SULIS_SLURM_LOGIN_NETNS=$LOGIN_NS
SULIS_SLURM_SWITCH_NETNS=$SWITCH_NS
SULIS_SLURM_CTLD_NETNS=$CTLD_NS
SULIS_SLURM_INTERFACE=$IFACE
SULIS_SLURM_SUBNET=$SUBNET.0/24
EOF
}

# Every namespace this cluster made (whatever size it was started with).
our_namespaces() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$NETNS_PREFIX-" || true
}

remove_network() {
    local ns pids
    for ns in $(our_namespaces); do
        # Anything still running in one of our namespaces is a leftover of a
        # job of this cluster (its slurmd is gone); it would keep it alive.
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        if [[ -n $pids ]]; then
            log "killing processes left in $ns:" $pids
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
        fi
        ip netns del "$ns" 2>/dev/null || log "could not remove namespace $ns"
    done
    rm -f "$NETNS_ENV"
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
    n=$(SLURM_CONF=$CONF in_login sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2=="idle"' | wc -l)
    [[ $n -eq ${#NODES[@]} ]]
}

write_slurm_conf() {
    local host n
    host=$(hostname -s)
    # Gotchas encoded here:
    # - ProctrackType=proctrack/linuxproc + TaskPlugin=task/none: cgroup plugins
    #   need a writable, delegated cgroup tree, which containers/CI VMs rarely give.
    # - SlurmdParameters=config_overrides: we claim CPUs=$NODE_CPUS and
    #   RealMemory=$NODE_MEMORY per node even on a 2-CPU box; without it slurmd sees fewer CPUs than
    #   configured and the node is drained ("Low socket*core*thread count").
    # - NodeHostname=<this host> for every node: that is what lets several
    #   slurmd (-N n1 ...) run on one machine. SLURM then reports
    #   SLURMD_NODENAME=n1..n3 while `hostname` is the same everywhere.
    #   NodeAddr is the node's own address, in its namespace; the ports still
    #   differ from node to node, though they need not any more.
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
SlurmctldHost=$host($CTLD_ADDR)
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
EOF
    for n in "${NODES[@]}"; do
        echo "NodeName=$n NodeHostname=$host NodeAddr=$(node_addr "$n") Port=$((SLURMD_PORT + ${n#n} - 1)) CPUs=$NODE_CPUS RealMemory=$NODE_MEMORY Gres=gpu:2 State=UNKNOWN"
    done >>"$CONF"
    echo "PartitionName=debug Nodes=n[1-$NODE_COUNT] Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
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
    if ! network_present && pid_alive "$STATE_DIR/slurmctld.pid"; then
        die "a cluster without network namespaces (an older cluster.sh) runs in $STATE_DIR;" \
            "stop it with the cluster.sh that started it, or choose another SULIS_SLURM_DIR"
    fi
    local t0=$SECONDS started=0
    mkdir -p "$STATE_DIR"/{ctld,log,spool}
    chmod 0755 "$STATE_DIR"
    setup_network
    start_munge
    write_slurm_conf
    if ! pid_alive "$STATE_DIR/slurmctld.pid"; then
        # -c: clear the state saved by a previous run, its jobs included.
        # A cluster stopped while a job ran (a test session that ended
        # before its jobs did) otherwise comes back with that job on its
        # nodes, "mixed" rather than idle, for minutes. -i: and ignore
        # errors reading what state is left.
        in_ns "$CTLD_NS" slurmctld -c -i \
            || die "slurmctld failed; see $STATE_DIR/log/slurmctld.log"
        started=1
    fi
    local n
    for n in "${NODES[@]}"; do
        pid_alive "$STATE_DIR/slurmd.$n.pid" && continue
        mkdir -p "$STATE_DIR/spool/$n"
        in_ns "$NETNS_PREFIX-$n" slurmd -N "$n" \
            || die "slurmd -N $n failed; see $STATE_DIR/log/slurmd.$n.log"
        started=1
    done
    if ! wait_for "$START_TIMEOUT" all_idle; then
        SLURM_CONF=$CONF in_login sinfo -N -l >&2 || true
        # Nobody would stop the daemons this start began (the caller sees a
        # failure, not a cluster): stop them. One found running is left.
        if (( started )); then
            stop >&2 || true
            die "nodes not idle after ${START_TIMEOUT}s; logs in $STATE_DIR/log (stopped again)"
        fi
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
    remove_network
    log "stopped"
}

# run CMD...: CMD in the login namespace, with this cluster's SLURM_CONF.
run() {
    network_present || die "no cluster in $STATE_DIR (start it first)"
    SLURM_CONF=$CONF exec nsenter --net="/run/netns/$LOGIN_NS" "$@"
}

# link NODE down|up: the switch's port of NODE (a network partition).
link() {
    local node=${1:?usage: cluster.sh link NODE down|up} state=${2:?usage: cluster.sh link NODE down|up}
    network_present || die "no cluster in $STATE_DIR (start it first)"
    ip -n "$SWITCH_NS" link set "v-$node" "$state"
    # Back up, the node's slurmd registers again at once (SIGHUP): slurmctld
    # does not ping a node it has set down, and its next full registration
    # round came 150 s later here.
    if [[ $state == up ]] && pid_alive "$STATE_DIR/slurmd.$node.pid"; then
        kill -HUP "$(cat "$STATE_DIR/slurmd.$node.pid")"
    fi
}

status() {
    daemons_alive || { log "not running (see pid files in $STATE_DIR)"; return 1; }
    if all_idle; then
        log "$NODE_COUNT nodes idle"
        return 0
    fi
    SLURM_CONF=$CONF in_login sinfo -N 2>&1 >&2 || true
    return 1
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    run) shift; run "$@" ;;
    link) shift; link "$@" ;;
    *) echo "usage: $0 start|stop|status|run CMD...|link NODE down|up" >&2; exit 2 ;;
esac
