"""Dask's own APIs through the executor: ``client.map`` and joblib.

``ex.client`` is an ordinary ``distributed.Client`` (and the default one
while the executor is open), so code written for Dask — ``client.map``,
``dask.delayed``, scikit-learn or anything else using joblib's ``"dask"``
backend — runs on the same cluster as ``ex.submit`` and ``ex.map``. Here in
the ``srun`` mode, but it works the same in every mode.

This replaces the classic recipe of starting a cluster by hand and then::

    client = Client(scheduler_file=...)
    with joblib.parallel_backend("dask"):
        ...
"""

import joblib
from _common import problem_size, report

from sulis_executor import SulisDaskExecutor


def cube(x: int) -> int:
    return x ** 3


if __name__ == "__main__":
    n = problem_size(2_000)
    expected = [cube(i) for i in range(n)]
    with SulisDaskExecutor() as ex:
        print(f"{ex.launch_mode} mode, {ex.num_workers} workers", flush=True)
        # Dask's futures API.
        futures = ex.client.map(cube, range(n))
        by_client_map = ex.client.gather(futures)
        # joblib, e.g. scikit-learn's n_jobs=-1, on the cluster.
        with joblib.parallel_config(backend="dask"):
            by_joblib = joblib.Parallel(batch_size=50)(joblib.delayed(cube)(i) for i in range(n))
        workers = ex.num_workers
    print(f"client.map and joblib agree on {n} cubes: {by_client_map == by_joblib == expected}")
    report(mode=ex.launch_mode, workers=workers,
           ok=by_client_map == expected and by_joblib == expected)
