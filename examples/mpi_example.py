"""Launch mode ``mpi``: the script runs as every MPI rank (``srun --mpi=pmi2``).

This replaces the classic Dask-MPI recipe::

    from dask_mpi import initialize
    initialize()                # rank 0: scheduler, rank 1: client, 2+: workers
    from dask.distributed import Client
    client = Client()

Rank 0 runs the scheduler and this script; every other rank becomes a worker
inside the ``SulisDaskExecutor()`` call and never returns from it (it exits
with status 0 when the executor below shuts down). So only rank 0 gets past
the constructor, and one task is set aside instead of two.
"""

import os

from _common import problem_size, report

from sulis_executor import SulisDaskExecutor


def inc(x: int) -> int:
    return x + 1


def rank_of_worker(_: int) -> str:
    return os.environ.get("PMI_RANK", os.environ.get("SLURM_PROCID", "?"))


if __name__ == "__main__":
    ex = SulisDaskExecutor()
    # From here on, this is rank 0.
    with ex:
        print(f"{ex.launch_mode} mode, {ex.num_workers} workers", flush=True)
        n = problem_size(10_000)
        total = sum(ex.map(inc, range(n), chunksize=100))
        ranks = sorted(set(ex.map(rank_of_worker, range(20 * ex.num_workers))), key=int)
        workers = ex.num_workers
    print(f"sum = {total}; work ran on ranks {', '.join(ranks)}")
    report(mode=ex.launch_mode, workers=workers, ok=total == n * (n + 1) // 2,
           rank=os.environ.get("PMI_RANK"), ranks=ranks)
