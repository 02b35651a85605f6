"""What ``SulisDaskExecutor()`` would do here, and why (``sulis-executor info``).

Everything is worked out from the environment and the options alone, with the
same functions the executor uses (:func:`~sulis_executor.config.resolve_options`,
:func:`~sulis_executor.launchers.choose_launch_mode`,
:meth:`~sulis_executor.slurm.SlurmAllocation.from_environ`): no cluster is
started, no process is spawned and mpi4py is never imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import OPTIONS, resolve_options
from .launchers import choose_launch_mode, mpi_world_size
from .launchers._resources import worker_threads
from .slurm import MEMORY_HEADROOM, SlurmAllocation

__all__ = ["describe_environment", "format_info"]

_MIB = 1024 * 1024


def _mib(n_bytes: int) -> int:
    return n_bytes // _MIB


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _memory_source(environ: Mapping[str, str], allocation: SlurmAllocation) -> str:
    per_cpu = environ.get("SLURM_MEM_PER_CPU", "").strip()
    if per_cpu.isdigit() and int(per_cpu):
        return (f"SLURM_MEM_PER_CPU={per_cpu} MiB x {allocation.cpus_per_task} "
                f"CPU(s) per task")
    per_node = environ.get("SLURM_MEM_PER_NODE", "").strip()
    if per_node == "0":
        return "SLURM_MEM_PER_NODE=0 (all of each node's memory: size unknown here)"
    if per_node.isdigit():
        if allocation.nodeid is not None:
            tasks = allocation.tasks_per_node[allocation.nodeid]
            where = "on this node"
        else:
            tasks = max(allocation.tasks_per_node)
            where = "on the busiest node"
        return f"SLURM_MEM_PER_NODE={per_node} MiB / {tasks} task(s) {where}"
    return "the job did not ask for memory (no --mem or --mem-per-cpu)"


def _allocation_info(environ: Mapping[str, str], allocation: SlurmAllocation) -> dict[str, Any]:
    raw = allocation.memory_per_worker_raw
    after = allocation.memory_per_worker
    return {
        "job_id": allocation.job_id,
        "step_id": allocation.step_id,
        "where": ("an srun step" if allocation.in_step
                  else "the batch script" if allocation.is_batch_step
                  else "an salloc shell"),
        "node_name": allocation.node_name,
        "nodes": list(allocation.nodes),
        "tasks_per_node": list(allocation.tasks_per_node),
        "ntasks": allocation.ntasks,
        "cpus_per_task": allocation.cpus_per_task,
        "memory_per_task_mib": None if raw is None else _mib(raw),
        "memory_per_task_after_headroom_mib": None if after is None else _mib(after),
        "memory_headroom": round(1 - MEMORY_HEADROOM, 4),
        "memory_source": _memory_source(environ, allocation),
        "gpus": list(allocation.gpus),
        "time_limit_s": allocation.time_limit_s,
        "partition": allocation.partition,
        "cluster_name": allocation.cluster_name,
    }


def _worker_memory(options: Any, allocation: SlurmAllocation | None) -> tuple[Any, str]:
    """``launchers._resources.worker_memory``, in MiB, with where it comes from."""
    if options.memory_limit is not None:
        return options.memory_limit, f"memory_limit option ({options.sources.get('memory_limit')})"
    if allocation is not None and allocation.memory_per_worker:
        return (f"{_mib(allocation.memory_per_worker)} MiB",
                (f"SLURM's {_mib(allocation.memory_per_worker_raw or 0)} MiB per task "
                 f"less {round((1 - MEMORY_HEADROOM) * 100)}% headroom"))
    return "auto", "Dask's default: a share of the machine's memory"


def describe_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """What ``SulisDaskExecutor()`` would do with this environment, as a
    JSON-able dict. Raises ``ValueError`` (naming the variable) or
    ``TypeError`` for a bad environment, as the executor would."""
    from .launchers._existing import find_existing_cluster

    options = resolve_options({}, environ)
    # Here only Dask's config can name one (e.g. DASK_SCHEDULER_ADDRESS).
    existing = find_existing_cluster(environ)
    mode, reason = choose_launch_mode(options, environ, existing)
    allocation = SlurmAllocation.from_environ(environ)
    info: dict[str, Any] = {
        "mode": mode,
        "reason": reason,
        "allocation": None if allocation is None else _allocation_info(environ, allocation),
        "options": {
            name: {"value": _jsonable(getattr(options, name)),
                   "source": options.sources.get(name, "default")}
            for name in OPTIONS
        },
        "workers": None,
        "threads_per_worker": None,
        "memory_per_worker": None,
        "memory_per_worker_source": None,
        "tasks_set_aside": None,
        "cluster": None,
        "problems": [],
    }

    if mode == "local":
        from .launchers.local import default_worker_count

        n = options.max_workers or default_worker_count()
        how = ("the max_workers option" if options.max_workers
               else "the CPUs this process may use")
        info.update(
            workers=n,
            threads_per_worker=1,  # each worker process runs one call at a time
            memory_per_worker=_jsonable(options.memory_limit) if options.memory_limit is not None else "auto",
            memory_per_worker_source=(
                f"memory_limit option ({options.sources.get('memory_limit')})"
                if options.memory_limit is not None
                else "Dask's default: the machine's memory shared among workers"),
            tasks_set_aside=0,
            cluster=(f"a local cluster of {n} worker processes ({how}), scheduler in this "
                     "process, on loopback" + (f" (interface {options.interface})"
                                               if options.interface else "")),
        )
    elif mode == "srun":
        if allocation is None:
            info["problems"].append(
                "launch='srun' needs a SLURM allocation, but SLURM_JOB_ID is not set")
        else:
            memory, source = _worker_memory(options, allocation)
            per_task = worker_threads(options, allocation)
            if per_task > 1:
                source += f"; a task's {per_task} workers share it"
            how = ("the nthreads option" if options.nthreads else "its CPUs")
            info.update(
                workers=allocation.ntasks * per_task,
                threads_per_worker=1,
                memory_per_worker=_jsonable(memory),
                memory_per_worker_source=source,
                tasks_set_aside=0,
                cluster=(f"scheduler in this process; one srun step, one process per node, "
                         f"running {allocation.ntasks * per_task} workers ({per_task} per SLURM "
                         f"task: {how}) on {len(allocation.nodes)} node(s)"),
            )
    elif mode == "mpi":
        world = mpi_world_size(environ)
        size = world[0] if world else None
        memory, source = _worker_memory(options, allocation)
        info.update(
            workers=None if size is None else size - 1,
            threads_per_worker=1,  # a rank is one worker process
            memory_per_worker=_jsonable(memory),
            memory_per_worker_source=source,
            tasks_set_aside=1,
            cluster=("MPI rank 0 runs the scheduler and the script; the other "
                     + ("" if size is None else f"{size - 1} ") + "ranks are workers"),
        )
        if size is None or size < 2:
            info["problems"].append("launch='mpi' needs at least 2 MPI ranks")
    elif mode == "scheduler_file":
        expected = None
        try:
            from .launchers.scheduler_file import expected_workers

            expected = expected_workers(options.wait_for_workers, environ)
        except (ImportError, AttributeError, TypeError):
            pass
        info.update(
            workers=expected,
            tasks_set_aside=None,
            cluster=(f"attaches to the cluster in scheduler file {options.scheduler_file!s}"
                     + (f", waiting for {expected} worker(s)" if expected else "")
                     + "; the cluster's workers keep their own threads and memory"),
        )
        if not options.scheduler_file:
            info["problems"].append("launch='scheduler_file' needs scheduler_file= "
                                    "(or SULIS_EXECUTOR_SCHEDULER_FILE)")
    elif mode == "attach":
        if existing is None:
            info["problems"].append(
                "launch='attach' needs a Dask cluster in the script's process (dask_mpi."
                "initialize(), an open distributed.Client, or Dask's scheduler-address)")
        else:
            info.update(cluster=f"joins {existing.description}; its workers keep their "
                                "own threads and memory")
    elif mode == "address":
        info.update(cluster=f"attaches to the running scheduler at {options.address}")
        if not options.address:
            info["problems"].append("launch='address' needs address= (or SULIS_EXECUTOR_ADDRESS)")
    return info


def _short_list(items: list[Any], limit: int = 16) -> str:
    text = [str(i) for i in items]
    if len(text) <= limit:
        return ", ".join(text)
    return ", ".join(text[: limit // 2]) + f", ... ({len(text)} in all)"


def _tasks_text(tasks: list[int]) -> str:
    if tasks and all(t == tasks[0] for t in tasks):
        return f"{tasks[0]} on each node"
    return _short_list(tasks)


def format_info(info: Mapping[str, Any]) -> str:
    """The human-readable form of :func:`describe_environment`'s answer."""
    lines = [f"launch mode: {info['mode']}", f"  why: {info['reason']}"]
    alloc = info["allocation"]
    if alloc is not None:
        where = alloc["where"] + (f" on {alloc['node_name']}" if alloc["node_name"] else "")
        lines += [
            "SLURM allocation:",
            f"  job id:           {alloc['job_id']}"
            + (f" (step {alloc['step_id']})" if alloc["step_id"] is not None else "")
            + f", seen from {where}",
            f"  nodes:            {_short_list(alloc['nodes'])} ({len(alloc['nodes'])} node(s))",
            (f"  tasks per node:   {_tasks_text(alloc['tasks_per_node'])} "
             f"({alloc['ntasks']} task(s) in all)"),
            f"  cpus per task:    {alloc['cpus_per_task']}",
        ]
        if alloc["memory_per_task_mib"] is not None:
            lines.append(
                f"  memory per task:  {alloc['memory_per_task_mib']} MiB "
                f"({alloc['memory_source']}); {alloc['memory_per_task_after_headroom_mib']} MiB "
                f"after {round(alloc['memory_headroom'] * 100)}% headroom")
        else:
            lines.append(f"  memory per task:  not known ({alloc['memory_source']})")
        if alloc["gpus"]:
            lines.append(f"  gpus:             {', '.join(alloc['gpus'])}")
        if alloc["time_limit_s"] is not None:
            lines.append(f"  time limit:       {alloc['time_limit_s']} s")
        if alloc["partition"]:
            lines.append(f"  partition:        {alloc['partition']}")
    lines.append("cluster:")
    if info["cluster"]:
        lines.append(f"  {info['cluster']}")
    if info["workers"] is not None:
        aside = info["tasks_set_aside"]
        lines.append(f"  workers:          {info['workers']}"
                     + ("" if aside is None else f" (tasks set aside: {aside}"
                        + (", rank 0)" if info["mode"] == "mpi" else ")")))
    if info["threads_per_worker"] is not None:
        lines.append(f"  threads each:     {info['threads_per_worker']}")
    if info["memory_per_worker"] is not None:
        lines.append(f"  memory each:      {info['memory_per_worker']} "
                     f"({info['memory_per_worker_source']})")
    for problem in info["problems"]:
        lines.append(f"  problem:          {problem}")
    changed = {k: v for k, v in info["options"].items() if v["source"] != "default"}
    if changed:
        lines.append("options not at their defaults:")
        for name, entry in changed.items():
            lines.append(f"  {name} = {entry['value']!r}  ({entry['source']})")
    return "\n".join(lines)
