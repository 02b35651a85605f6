"""Ready-to-submit batch scripts (``sulis-executor template``), one per mode.

They follow ``examples/*.sbatch``, which the SLURM tests run as real jobs.
"""

from __future__ import annotations

import dataclasses
import re
import shlex

__all__ = ["TEMPLATE_MODES", "BatchResources", "NodeSize", "node_size_from_sinfo",
           "render_template", "tasks_per_node_choice"]

#: Modes a batch script can be written for (``local``/``address`` need none).
TEMPLATE_MODES = ("srun", "mpi", "scheduler-file")

_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}")
_MEMORY = re.compile(r"\d+[KMGT]?", re.IGNORECASE)
_NAME = re.compile(r"[A-Za-z0-9._+@%=,/-]+")

#: Tasks per node when the machine cannot tell (no SLURM here).
DEFAULT_TASKS_PER_NODE = 4

#: What the template asks sinfo: one line per node and partition, its
#: partition (the default one marked ``*``) and its CPUs.
SINFO_COMMAND = ("sinfo", "--noheader", "--Node", "--format=%P %c")


@dataclasses.dataclass(frozen=True)
class NodeSize:
    """The CPUs per node of a partition, as sinfo reports them."""

    partition: str
    cpus: int  # the fewest of any node in the partition, so every node fits
    largest: int  # differs from ``cpus`` in a partition of mixed nodes


def node_size_from_sinfo(output: str, partition: str | None) -> NodeSize | None:
    """Parse ``sinfo --noheader --Node --format='%P %c'``: the node size of
    ``partition``, or of the default partition (marked ``*``), or of every
    node when none is marked. ``None`` if no node matches."""
    rows: list[tuple[str, bool, int]] = []
    for line in output.splitlines():
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            continue
        name, cpus = fields[0], int(fields[1])
        rows.append((name.rstrip("*"), name.endswith("*"), cpus))
    if partition is not None:
        chosen = [row for row in rows if row[0] == partition]
    else:
        chosen = [row for row in rows if row[1]] or rows
    if not chosen:
        return None
    names = sorted({name for name, _, _ in chosen})
    sizes = [size for _, _, size in chosen]
    return NodeSize(partition=",".join(names), cpus=min(sizes), largest=max(sizes))


def tasks_per_node_choice(size: NodeSize | None, cpus_per_task: int,
                          why_not: str = "") -> tuple[int, str]:
    """``--ntasks-per-node`` when the user gave none: each node's CPUs over
    ``cpus_per_task`` (whole nodes, as the Sulis Dask page's job asks), else
    the default; and a line saying which, for the user to read."""
    if size is None:
        return DEFAULT_TASKS_PER_NODE, (
            f"--ntasks-per-node={DEFAULT_TASKS_PER_NODE}: the default, as {why_not or 'no SLURM answered'}; "
            "pass --ntasks-per-node to choose")
    tasks = max(1, size.cpus // max(1, cpus_per_task))
    mixed = (f" (the fewest of its nodes; others have {size.largest})"
             if size.largest != size.cpus else "")
    return tasks, (
        f"--ntasks-per-node={tasks}: sinfo reports {size.cpus} CPUs per node in partition "
        f"{size.partition}{mixed}, over --cpus-per-task={cpus_per_task}; "
        "pass --ntasks-per-node to choose")


@dataclasses.dataclass(frozen=True)
class BatchResources:
    nodes: int = 1
    ntasks_per_node: int = DEFAULT_TASKS_PER_NODE
    cpus_per_task: int = 1
    mem_per_cpu: str | None = None
    time: str = "01:00:00"
    account: str | None = None
    partition: str | None = None
    job_name: str | None = None

    def check(self, mode: str) -> None:
        """Raise ``ValueError`` naming the option for a value SLURM would refuse
        (or that would break the ``#SBATCH`` line)."""
        for name in ("nodes", "ntasks_per_node", "cpus_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if mode == "mpi" and self.nodes * self.ntasks_per_node < 2:
            raise ValueError("mpi mode needs at least 2 tasks (rank 0 runs the scheduler and "
                             "the script, the others are workers): raise --ntasks-per-node "
                             "or --nodes")
        if self.mem_per_cpu is not None and not _MEMORY.fullmatch(self.mem_per_cpu):
            raise ValueError(f"--mem-per-cpu={self.mem_per_cpu!r}: expected a size in MiB "
                             "such as 3850, or with a unit such as 4G")
        if not _TIME.fullmatch(self.time):
            raise ValueError(f"--time={self.time!r}: expected a SLURM time such as 01:00:00, "
                             "90 (minutes) or 1-12:00:00")
        for name in ("account", "partition", "job_name"):
            value = getattr(self, name)
            if value is not None and not _NAME.fullmatch(value):
                raise ValueError(f"--{name.replace('_', '-')}={value!r}: use letters, digits "
                                 "and ._+@%=,/- only")


def _sbatch_lines(resources: BatchResources, job_name: str) -> list[str]:
    lines = [
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={resources.nodes}",
        f"#SBATCH --ntasks-per-node={resources.ntasks_per_node}",
        f"#SBATCH --cpus-per-task={resources.cpus_per_task}",
    ]
    if resources.mem_per_cpu is not None:
        lines.append(f"#SBATCH --mem-per-cpu={resources.mem_per_cpu}")
    lines.append(f"#SBATCH --time={resources.time}")
    if resources.account:
        lines.append(f"#SBATCH --account={resources.account}")
    if resources.partition:
        lines.append(f"#SBATCH --partition={resources.partition}")
    return lines


_ENVIRONMENT = """\
# Load Python and activate an environment with sulis-executor{extra}, e.g. on Sulis:
#   module purge && module load {modules}
#   source ~/venvs/sulis/bin/activate
PYTHON=${{PYTHON:-python}}
# Dask traffic over InfiniBand rather than Ethernet, if the nodes have it:
#   export SULIS_EXECUTOR_INTERFACE=ib0
"""

_HEADERS = {
    "srun": """\
# Launch mode "srun": the Python script runs directly in the batch script,
# and SulisDaskExecutor() starts a worker process per CPU of each SLURM task
# ({ntasks} tasks in all), all started by one srun step; no task is set aside
# for the scheduler, which runs in the script's process.
""",
    "mpi": """\
# Launch mode "mpi": the Python script runs as {ntasks} MPI ranks; in
# SulisDaskExecutor(), rank 0 starts the scheduler and goes on to run the
# script, ranks 1..{last} become workers ({workers} of them) and never return
# from the constructor. Needs mpi4py (pip install 'sulis-executor[mpi]').
""",
    "scheduler-file": """\
# Launch mode "scheduler_file": this script starts a Dask cluster with Dask's
# own commands (dask scheduler, and dask worker once per SLURM task: {ntasks}
# workers), and SulisDaskExecutor() in the Python script attaches to it
# through the scheduler file (SULIS_EXECUTOR_SCHEDULER_FILE). Note that this
# cluster uses plain TCP, without the TLS the other modes set up.
""",
}

_BODIES = {
    "srun": """\
"$PYTHON" {command}
""",
    "mpi": """\
# --mpi=pmi2 for MPICH builds (use your site's default, e.g. pmix, for Open
# MPI). --kill-on-bad-exit=1: if a rank fails, end the others at once rather
# than leave them waiting for it.
srun --mpi="${{SRUN_MPI:-pmi2}}" --kill-on-bad-exit=1 "$PYTHON" {command}
""",
    "scheduler-file": """\
INTERFACE=${{SULIS_EXECUTOR_INTERFACE:-}}
# The file must be on a file system every node shares (not /tmp).
SCHEDULER_FILE=${{SCHEDULER_FILE:-$PWD/scheduler-$SLURM_JOB_ID.json}}
export SULIS_EXECUTOR_SCHEDULER_FILE=$SCHEDULER_FILE
rm -f "$SCHEDULER_FILE"   # never attach to a previous job's scheduler
# Dask's commands log at INFO; keep only warnings and errors in the output.
export DASK_LOGGING__DISTRIBUTED=${{DASK_LOGGING__DISTRIBUTED:-warning}}

# The scheduler, in the background on the first node.
"$PYTHON" -m dask scheduler --scheduler-file "$SCHEDULER_FILE" \\
    ${{INTERFACE:+--interface "$INTERFACE"}} --port 0 --no-dashboard --dashboard-address :0 &
scheduler=$!

# One worker per task, with the task's CPUs as threads and its memory less
# 5% headroom; --overlap shares the allocation with the batch step. Workers
# give up if the scheduler vanishes.
memory=auto
if [[ -n ${{SLURM_MEM_PER_CPU:-}} && ${{SLURM_MEM_PER_CPU}} -gt 0 ]]; then
    memory=$(( SLURM_MEM_PER_CPU * ${{SLURM_CPUS_PER_TASK:-1}} * 95 / 100 ))MiB
elif [[ -n ${{SLURM_MEM_PER_NODE:-}} && ${{SLURM_MEM_PER_NODE}} -gt 0 ]]; then
    memory=$(( SLURM_MEM_PER_NODE * 95 / 100 / {ntasks_per_node} ))MiB
fi
srun --overlap --kill-on-bad-exit=0 "$PYTHON" -m dask worker \\
    --scheduler-file "$SCHEDULER_FILE" ${{INTERFACE:+--interface "$INTERFACE"}} \\
    --nworkers 1 --nthreads "${{SLURM_CPUS_PER_TASK:-1}}" --memory-limit "$memory" \\
    --no-nanny --death-timeout 60 --no-dashboard &
workers=$!

"$PYTHON" {command}
status=$?

# Stop the cluster: the scheduler tells the workers to close, srun ends.
kill -TERM "$scheduler"
wait "$workers" "$scheduler"
rm -f "$SCHEDULER_FILE"
exit $status
""",
}


_RESUMABLE = """\
# Resumable (the sulis_executor manual, "Long runs"): SLURM sends SIGUSR1 to this shell
# 120 s before the time limit (--signal=B:USR1@120); exec makes Python that
# shell, so the executor gets it, stops starting calls, and the calls never
# started fail with WalltimeExceeded while the script saves what it has.
# Calls also stop starting SULIS_EXECUTOR_WALLTIME_MARGIN s (default 60) plus
# a call's measured duration before the limit. The journal records finished
# calls, so the next run (sbatch again, or sulis_executor.requeue() at the
# end of the script: the job was submitted with --requeue) only runs the rest.
export SULIS_EXECUTOR_JOURNAL=${{SULIS_EXECUTOR_JOURNAL:-run.journal}}
exec "$PYTHON" {command}
"""


def default_job_name(script: str) -> str:
    stem = script.rsplit("/", 1)[-1]
    stem = stem.removesuffix(".py")
    name = re.sub(r"[^A-Za-z0-9._-]", "-", stem).strip("-")
    return name or "sulis-job"


def render_template(mode: str, script: str, resources: BatchResources,
                    script_args: list[str] | tuple[str, ...] = (), resumable: bool = False) -> str:
    """The batch script that runs ``python script [args]`` in ``mode``;
    ``resumable`` (srun mode): with SIGUSR1 before the end, ``--requeue``,
    ``exec python`` and the resume journal.

    Raises ``ValueError`` for an unknown mode or a bad resource value.
    """
    mode = mode.replace("_", "-")
    if mode not in TEMPLATE_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(TEMPLATE_MODES)}")
    if resumable and mode != "srun":
        raise ValueError("--resumable is for srun mode, where the script runs in the batch "
                         "shell that SLURM's early-warning signal reaches")
    resources.check(mode)
    job_name = resources.job_name or default_job_name(script)
    ntasks = resources.nodes * resources.ntasks_per_node
    command = " ".join(shlex.quote(a) for a in (script, *script_args))
    header = _HEADERS[mode].format(ntasks=ntasks, last=ntasks - 1, workers=ntasks - 1)
    environment = _ENVIRONMENT.format(
        extra=" and mpi4py" if mode == "mpi" else "",
        modules=("GCC/11.3.0 OpenMPI/4.1.4 mpi4py/3.1.4" if mode == "mpi"
                 else "GCC/11.3.0 Python/3.10.4"),
    )
    body = (_RESUMABLE if resumable else _BODIES[mode]).format(
        command=command, ntasks_per_node=resources.ntasks_per_node)
    sbatch = _sbatch_lines(resources, job_name)
    if resumable:
        sbatch += ["#SBATCH --signal=B:USR1@120", "#SBATCH --requeue"]
    return "\n".join([
        "#!/bin/bash",
        f"# Written by 'sulis-executor template {mode}'. Submit with: sbatch <this file>",
        header.rstrip("\n"),
        "#",
        *sbatch,
        "",
        environment.rstrip("\n"),
        "",
        body,
    ])
