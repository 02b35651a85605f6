"""Launch mode ``srun``: a plain ``python srun_example.py`` in a batch script.

Before (one node only)::

    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor() as ex:
        ...

After: the same code, on every node of the allocation. The executor starts
the scheduler here, and with ``srun`` one process per node, which forks a
worker process per CPU of the node's SLURM tasks (``nthreads=1``: one per
task, for calls that use all the task's CPUs themselves); each runs one call
at a time.
"""

import math
import os

from _common import problem_size, report

from sulis_executor import SulisDaskExecutor


def count_primes(chunk: range) -> int:
    """CPU-bound work: primes in ``chunk``, by trial division."""
    return sum(
        1 for n in chunk
        if n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))
    )


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME", "?")


if __name__ == "__main__":
    size = problem_size(200_000)
    chunks = [range(start, min(start + 10_000, size)) for start in range(0, size, 10_000)]

    with SulisDaskExecutor() as ex:  # was: ProcessPoolExecutor()
        print(f"{ex.launch_mode} mode, {ex.num_workers} workers", flush=True)
        total = sum(ex.map(count_primes, chunks))
        # ex.client is a plain distributed.Client. Its workers are the nodes'
        # agents, each with a thread per worker process of its node.
        nodes = sorted(set(ex.client.run(node_name).values()))
        threads = sorted(ex.client.nthreads().values())
        workers = ex.num_workers

    expected = count_primes(range(0, size))
    print(f"{total} primes below {size}, with workers on nodes {', '.join(nodes)}")
    report(mode=ex.launch_mode, workers=workers, ok=total == expected, threads=threads,
           nodes=nodes)
