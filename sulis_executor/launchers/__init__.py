"""Launch modes, one module each, behind :class:`~.base.Launcher`.

:func:`choose_launch_mode` is where ``launch='auto'`` is decided; the rule is
documented in ``docs/launch_modes.rst`` as a table, and every choice carries
its reason, which the executor logs.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..config import LAUNCH_MODES, ExecutorOptions
from ..slurm import SlurmAllocation
from .base import Cluster, Launcher

if TYPE_CHECKING:
    from ._existing import ExistingCluster

__all__ = ["Cluster", "Launcher", "choose_launch_mode", "make_launcher", "mpi_world_size"]

# mode -> "module:Class"; modules are imported only when chosen, so that
# e.g. mpi4py is never imported unless the MPI mode is used.
_LAUNCHERS = {
    "local": "local:LocalLauncher",
    "attach": "attach:AttachLauncher",
    "address": "address:AddressLauncher",
    "scheduler_file": "scheduler_file:SchedulerFileLauncher",
    "srun": "srun:SrunLauncher",
    "mpi": "mpi:MpiLauncher",
}

# Variables MPI launchers set to the world size, checked in this order.
# PMI_SIZE: MPICH/Intel MPI under mpiexec (hydra) and under srun --mpi=pmi2;
# OMPI_COMM_WORLD_SIZE: Open MPI's mpirun; MV2_COMM_WORLD_SIZE: MVAPICH2.
_MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE")


def mpi_world_size(environ: Mapping[str, str]) -> tuple[int, str] | None:
    """``(size, evidence)`` of the MPI world this process was launched in,
    judged from the environment alone (importing mpi4py would initialise MPI,
    which a process that is not an MPI rank must not do). None if none found.
    """
    for var in _MPI_SIZE_VARS:
        value = environ.get(var, "").strip()
        if value.isdigit():
            return int(value), f"{var}={value}"
    # srun --mpi=pmix sets PMIX_RANK but no size: the step's tasks are the world.
    if "PMIX_RANK" in environ:
        tasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or ""
        if tasks.strip().isdigit():
            return int(tasks), f"PMIX_RANK is set and SLURM_STEP_NUM_TASKS={tasks}"
    return None


def choose_launch_mode(options: ExecutorOptions, environ: Mapping[str, str],
                       existing: ExistingCluster | None = None) -> tuple[str, str]:
    """Return ``(mode, reason)`` for these options and this environment.

    In order: an explicit ``launch=``, ``address=`` or ``scheduler_file=``;
    a cluster this process already uses (``existing``, from
    ``_existing.find_existing_cluster``: dask-mpi's, the user's default
    client's, or one Dask's config names; ``attach``); an MPI world of more
    than one process (``mpi``); a SLURM allocation seen from outside any
    step, i.e. the batch script or an ``salloc`` shell (``srun``); otherwise
    ``local``.
    """
    if options.launch != "auto":
        return options.launch, f"launch={options.launch!r} was given ({options.sources.get('launch', 'argument')})"
    if options.address:
        return "address", f"an address was given ({options.sources.get('address', 'argument')})"
    if options.scheduler_file:
        return "scheduler_file", (
            f"a scheduler file was given ({options.sources.get('scheduler_file', 'argument')})"
        )
    if existing is not None:
        return "attach", existing.reason
    world = mpi_world_size(environ)
    if world is not None and world[0] > 1:
        size, evidence = world
        return "mpi", (
            f"this process is one of {size} MPI ranks ({evidence}): rank 0 runs the "
            "scheduler and the script, the other ranks become workers"
        )
    allocation = SlurmAllocation.from_environ(environ)
    if allocation is None:
        if world is not None:
            return "local", f"an MPI world of one process ({world[1]}) and no SLURM allocation"
        return "local", "no SLURM allocation (SLURM_JOB_ID unset) or MPI world was found"
    if allocation.in_step:
        return "local", (
            f"inside step {allocation.step_id} of SLURM job {allocation.job_id} but not an "
            "MPI rank: each task of the step runs its own copy of this script, so each gets "
            "a local cluster on its own CPUs. Run the script directly in the batch script "
            "(launch='srun') or under 'srun --mpi=pmi2' (launch='mpi') for one cluster over "
            "the allocation"
        )
    where = "the batch script" if allocation.is_batch_step else "an salloc shell"
    return "srun", (
        f"{where} of SLURM job {allocation.job_id}: a worker process per CPU of every task "
        f"({allocation.ntasks} tasks on {len(allocation.nodes)} nodes, "
        f"{allocation.cpus_per_task} CPU(s) each), started by one srun step"
    )


def make_launcher(mode: str, options: ExecutorOptions, security: object = None,
                  existing: ExistingCluster | None = None) -> Launcher:
    """The launcher for ``mode``; ``existing`` is the cluster ``attach`` joins."""
    if mode not in LAUNCH_MODES or mode == "auto":
        raise ValueError(f"unknown launch mode {mode!r}; expected one of {', '.join(LAUNCH_MODES)}")
    if mode not in _LAUNCHERS:
        raise NotImplementedError(f"launch={mode!r} is not available in this version")
    module_name, class_name = _LAUNCHERS[mode].split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    extra = {"existing": existing} if mode == "attach" else {}
    launcher: Launcher = getattr(module, class_name)(options, security, **extra)
    return launcher
