"""Launch mode ``scheduler_file``: attach to a cluster the batch script started.

The batch script starts ``dask scheduler --scheduler-file F`` and
``srun dask worker --scheduler-file F``; this script finds the scheduler
through the same file, waits for one worker per SLURM task, and uses it with
the ``concurrent.futures`` API. Closing the executor only detaches: the
batch script stops the cluster.
"""

import os

from _common import problem_size, report

from sulis_executor import SulisDaskExecutor


def square(x: int) -> int:
    return x * x


if __name__ == "__main__":
    scheduler_file = os.environ["SCHEDULER_FILE"]
    with SulisDaskExecutor(scheduler_file=scheduler_file) as ex:
        print(f"{ex.launch_mode} mode, {ex.num_workers} workers", flush=True)
        n = problem_size(10_000)
        futures = [ex.submit(square, i) for i in range(n)]
        total = sum(f.result() for f in futures)
        workers = ex.num_workers
    print(f"sum of squares below {n} = {total}")
    report(mode=ex.launch_mode, workers=workers,
           ok=total == sum(i * i for i in range(n)))
