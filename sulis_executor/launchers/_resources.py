"""What each worker gets: threads, memory, and the flags that say so.

One place for the rule every mode follows, and that ``sulis-executor info``
reports: an explicit option wins; otherwise a SLURM task's CPUs and memory
(less headroom, see :mod:`sulis_executor.slurm`); otherwise one thread and
Dask's ``auto`` memory limit, as on a laptop.
"""

from __future__ import annotations

from ..config import ExecutorOptions
from ..slurm import SlurmAllocation


def worker_threads(options: ExecutorOptions, allocation: SlurmAllocation | None) -> int:
    if options.nthreads:
        return options.nthreads
    return allocation.cpus_per_task if allocation is not None else 1


def worker_memory(options: ExecutorOptions, allocation: SlurmAllocation | None) -> str | int:
    if options.memory_limit is not None:
        return options.memory_limit
    if allocation is not None and allocation.memory_per_worker:
        return allocation.memory_per_worker
    return "auto"


def worker_flags(options: ExecutorOptions, allocation: SlurmAllocation | None) -> list[str]:
    """Command-line flags of ``python -m sulis_executor.worker`` for these
    options (the scheduler address, name, binding and credentials aside)."""
    flags = [
        "--nthreads", str(worker_threads(options, allocation)),
        "--memory-limit", str(worker_memory(options, allocation)),
    ]
    if options.interface:
        flags += ["--interface", options.interface]
    if options.local_directory:
        flags += ["--local-directory", options.local_directory]
    if options.verbose:
        flags.append("--verbose")
    if options.dashboard:
        flags.append("--profile")  # feeds the dashboard's Profile page
    return flags
