#!/usr/bin/env bash
# Regenerate tests/data/slurm_env/*.env: the SLURM_* environment that real
# SLURM (the local test cluster from cluster.sh) gives batch scripts, srun
# tasks and salloc shells.  tests/test_slurm_allocation.py parses these dumps,
# so the parser is tested against what SLURM really exports, not our guesses.
#
#   tests/slurm/capture_env.sh [OUTDIR]     # default tests/data/slurm_env
#
# Starts the cluster if it isn't up (and leaves it running).  Job ids and
# timestamps differ on every run; the tests only pin values that don't.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(realpath -m "${1:-$HERE/../data/slurm_env}")
eval "$("$HERE/cluster.sh" start)"
# Submit from the cluster's login node (its network namespace), as a user
# would: the rest of this script runs there.
if [[ -z ${SULIS_CAPTURE_IN_LOGIN:-} ]]; then
    SULIS_CAPTURE_IN_LOGIN=1 exec "$HERE/cluster.sh" run bash "$0" "$@"
fi

# Don't leak a surrounding job's SLURM_* variables into the new jobs (srun and
# sbatch read many of them as defaults); keep only our SLURM_CONF.
while read -r v; do
    [[ $v == SLURM_CONF ]] || unset "$v"
done < <(compgen -e | grep -E '^SLURM' || true)

# What we keep from each environment: SLURM's own variables plus the GPU
# variables SLURM sets when GPUs are allocated.
FILTER='^(SLURM_|SLURMD_|CUDA_VISIBLE_DEVICES=|GPU_DEVICE_ORDINAL=|ROCR_VISIBLE_DEVICES=)'

WORK=$(mktemp -d /tmp/sulis-capture.XXXXXX)
chmod 0755 "$WORK"  # jobs may run as another user than the caller in CI
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
cd "$WORK"

# `dump NAME` (run inside the jobs): write the filtered, sorted environment
# to $WORK/NAME.raw.  A script on PATH rather than a bash function because
# `sbatch --wrap` runs /bin/sh (dash on Debian), which can't import functions.
cat >"$WORK/dump" <<EOF
#!/bin/sh
env | grep -E '$FILTER' | sort >"$WORK/\$1.raw"
EOF
chmod 0755 "$WORK/dump"
export PATH=$WORK:$PATH

# finish NAME COMMAND...: prefix the provenance line and move into $OUT.
finish() {
    local name=$1; shift
    [[ -s $WORK/$name.raw ]] || { echo "capture_env.sh: no dump for $name" >&2; exit 1; }
    { echo "# captured from: $*"; cat "$WORK/$name.raw"; } >"$OUT/$name.env"
    echo "wrote $OUT/$name.env" >&2
}

# 1. Multi-node job with -c and --mem-per-cpu: the batch step itself, srun
#    task 0 (on n1) and task 3 (on n2, second node).
cmd=(sbatch --wait -N 3 --ntasks-per-node=2 --cpus-per-task=2 --mem-per-cpu=500 -o /dev/null)
"${cmd[@]}" --wrap 'dump batch_step_multinode
srun bash -c "case \$SLURM_PROCID in 0) dump srun_step_multinode;; 3) dump srun_step_multinode_task3;; esac"' >/dev/null
finish batch_step_multinode "${cmd[*]} --wrap 'env | ...'"
finish srun_step_multinode "${cmd[*]} --wrap 'srun bash -c \"env | ...\"'  # task 0"
finish srun_step_multinode_task3 "${cmd[*]} --wrap 'srun bash -c \"env | ...\"'  # task 3"

# 1b. A step using only part of the job: inside it SLURM_NODELIST is still
#     the job's n[1-3] but SLURM_TASKS_PER_NODE is the step's "2,1", so the
#     parser must use SLURM_STEP_NODELIST / SLURM_STEP_TASKS_PER_NODE.
cmd=(sbatch --wait -N 3 --ntasks-per-node=2 -o /dev/null)
"${cmd[@]}" --wrap 'srun -N 2 -n 3 bash -c "[ \$SLURM_PROCID != 2 ] || dump srun_step_subset"' >/dev/null
finish srun_step_subset "${cmd[*]} --wrap 'srun -N 2 -n 3 bash -c \"env | ...\"'  # task 2"

# 1c. GPUs (the cluster has 2 fake GPUs per node).
cmd=(sbatch --wait -N 1 --ntasks-per-node=2 --gres=gpu:2 -o /dev/null)
"${cmd[@]}" --wrap 'dump batch_gpus
srun bash -c "[ \$SLURM_PROCID != 0 ] || dump srun_step_gpus"' >/dev/null
finish batch_gpus "${cmd[*]} --wrap 'env | ...'"
finish srun_step_gpus "${cmd[*]} --wrap 'srun bash -c \"env | ...\"'  # task 0"

# 2. -n without -c: no SLURM_CPUS_PER_TASK, uneven tasks per node.
cmd=(sbatch --wait -N 2 -n 3 -o /dev/null)
"${cmd[@]}" --wrap 'dump batch_no_cpus_per_task' >/dev/null
finish batch_no_cpus_per_task "${cmd[*]} --wrap 'env | ...'"

# 3. --mem (per node) instead of --mem-per-cpu.
cmd=(sbatch --wait -N 2 --ntasks-per-node=2 --mem=1200 -o /dev/null)
"${cmd[@]}" --wrap 'dump batch_mem_per_node' >/dev/null
finish batch_mem_per_node "${cmd[*]} --wrap 'env | ...'"

# 4. The salloc shell (runs on the submit host, outside any step).
cmd=(salloc -N 2 -n 2 --cpus-per-task=1)
"${cmd[@]}" bash -c 'dump salloc' 2>/dev/null
finish salloc "${cmd[*]} bash -c 'env | ...'"

# 5. A time limit.
cmd=(sbatch --wait -N 1 -n 1 --time=00:10:00 -o /dev/null)
"${cmd[@]}" --wrap 'dump batch_time_limit' >/dev/null
finish batch_time_limit "${cmd[*]} --wrap 'env | ...'"
