"""One measurement, in a fresh process.

    python -m benchmarks.cases EXECUTOR CASE N [WORKERS]

runs CASE once on EXECUTOR and prints one line, ``BENCH_RESULT {json}``, with
its measurements (or ``{"error": ...}``). All timing happens here; every case
checks its results before its time counts. ``benchmarks.run`` starts one of
these per measurement; for ``mpi4py`` it runs it under
``mpiexec -n WORKERS+1 python -m mpi4py.futures -m benchmarks.cases ...``.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import time
from pathlib import Path

from .tasks import (
    SLEEP_SECONDS,
    array_sum,
    block_plus,
    inc,
    random_block,
    sleep_for,
    sleep_then_return,
)

MARKER = "BENCH_RESULT "


# -- executors ----------------------------------------------------------------
# Each adapter: load() imports, start(workers) builds, then map/submit/gather/close.


class Sulis:
    chunked = False

    def load(self):
        from sulis_executor import SulisDaskExecutor

        self._cls = SulisDaskExecutor

    def start(self, workers):
        self.ex = self._cls(max_workers=workers)

    def map(self, fn, items, n):
        # "Default args" means what a user who swaps the import gets: no
        # chunksize at all (ProcessPoolExecutor's default is 1 anyway).
        if self.chunked:
            return self.ex.map(fn, items, chunksize=max(1, n // 8))
        return self.ex.map(fn, items)

    def map_chunks(self, fn, items, chunksize):
        """``map`` with an explicit chunksize (the chunksize case)."""
        return self.ex.map(fn, items, chunksize=chunksize)

    def submit(self, fn, *args):
        return self.ex.submit(fn, *args)

    def gather(self, futures):
        return [f.result() for f in futures]

    def close(self):
        self.ex.shutdown(wait=True)


class SulisChunked(Sulis):
    chunked = True


class SulisSpawn(Sulis):
    """Workers as fresh interpreters instead of forks of the fork server."""

    def start(self, workers):
        self.ex = self._cls(max_workers=workers, mp_context="spawn")


class PPE(Sulis):
    def load(self):
        from concurrent.futures import ProcessPoolExecutor

        self._cls = ProcessPoolExecutor


class PPEChunked(PPE):
    chunked = True


class MPI(Sulis):
    def load(self):
        from mpi4py.futures import MPIPoolExecutor

        self._cls = MPIPoolExecutor

    def start(self, workers):
        # Under `python -m mpi4py.futures` the pool is the other MPI ranks.
        self.ex = self._cls()


class MPIChunked(MPI):
    chunked = True


class Dask:
    """Raw Dask: client.map + gather on a loopback LocalCluster."""

    def load(self):
        from distributed import Client, LocalCluster

        self._client_cls, self._cluster_cls = Client, LocalCluster

    def start(self, workers):
        self.cluster = self._cluster_cls(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            scheduler_port=0,
            dashboard_address=None,
            # The scheduler's HTTP /health endpoint: random loopback port, not 8787.
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        )
        self.client = self._client_cls(self.cluster)

    # pure=False everywhere: with Dask's default pure=True, identical calls
    # (200 sleeps of the same argument) would run once.
    def map(self, fn, items, n):
        return self.client.gather(self.client.map(fn, items, pure=False))

    def submit(self, fn, *args):
        return self.client.submit(fn, *args, pure=False)

    def gather(self, futures):
        return self.client.gather(futures)

    def close(self):
        self.client.close()
        self.cluster.close()


class DaskExecutor(Dask):
    """Dask's own concurrent.futures adapter, client.get_executor(pure=False)."""

    chunked = False

    def start(self, workers):
        super().start(workers)
        self.ex = self.client.get_executor(pure=False)

    # The concurrent.futures API, as for the other executors.
    map = Sulis.map
    submit = Sulis.submit
    gather = Sulis.gather

    def close(self):
        self.ex.shutdown(wait=True)
        super().close()


EXECUTORS = {
    "sulis": Sulis,
    "sulis_chunked": SulisChunked,
    "sulis_spawn": SulisSpawn,
    "ppe": PPE,
    "ppe_chunked": PPEChunked,
    "dask": Dask,
    "dask_executor": DaskExecutor,
    "mpi4py": MPI,
    "mpi4py_chunked": MPIChunked,
}


# -- memory -------------------------------------------------------------------


def _status_kb(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.MULTILINE).group(1))


def _reset_peak_rss():
    """Reset VmHWM (Linux >= 4.0); returns False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _pss_kb(pid):
    """Proportional set size of a process: its private pages plus its share
    of the pages it shares (each shared page divided among its sharers)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return int(re.search(r"^Pss:\s+(\d+)", f.read(), re.MULTILINE).group(1))


def _descendants():
    """Every process started by this one, recursively: the cluster (fork
    server, agents, members, workers), found through /proc."""
    import psutil  # a dependency of distributed

    return psutil.Process().children(recursive=True)


def _settled_descendants(deadline_s=15.0, quiet_s=1.0):
    """The descendants, once their set has not changed for ``quiet_s``
    (workers that start late, or helpers that leave, are not counted half)."""
    procs = {p.pid: p for p in _descendants()}
    stable_since = time.monotonic()
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = {p.pid: p for p in _descendants()}
        if now.keys() != procs.keys():
            procs, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= quiet_s:
            break
    return list(procs.values())


# -- cases --------------------------------------------------------------------


class Unsupported(Exception):
    """This case cannot be measured here; the message says why."""


def check(ok, what):
    if not ok:
        raise AssertionError(f"wrong result: {what}")


def warm_up(ex, workers):
    check(ex.submit(inc, 1).result() == 2, "warm-up submit")
    check(
        sum(ex.map(inc, range(4 * workers), 4 * workers))
        == sum(range(1, 4 * workers + 1)),
        "warm-up map",
    )


def case_startup(ex, n, workers):
    t0 = time.perf_counter()
    ex.load()
    t1 = time.perf_counter()
    ex.start(workers)
    result = ex.submit(inc, 1).result()
    t2 = time.perf_counter()
    check(result == 2, "inc(1)")
    ex.close()
    t3 = time.perf_counter()
    return {
        "import_s": t1 - t0,
        "first_result_s": t2 - t1,
        "cold_first_result_s": t2 - t0,
        "shutdown_s": t3 - t2,
    }


def _timed(ex, n, workers, body):
    ex.load()
    ex.start(workers)
    warm_up(ex, workers)
    try:
        return body()
    finally:
        ex.close()


def _inc_rate(start_map, items):
    """Read ``start_map()``, a map of ``inc`` over ``range(items)``, as it
    comes: its time and rate, once the results are checked."""
    t0 = time.perf_counter()
    total = 0
    for r in start_map():
        total += r
    dt = time.perf_counter() - t0
    check(total == items * (items + 1) // 2, f"sum of inc over range({items})")
    return {"seconds": dt, "items_per_s": items / dt}


def case_map(ex, n, workers):
    def start_map():
        return ex.map(inc, range(n), n)

    return _timed(ex, n, workers, lambda: _inc_rate(start_map, n))


def case_submit(ex, n, workers):
    def body():
        t0 = time.perf_counter()
        futures = [ex.submit(inc, i) for i in range(n)]
        results = ex.gather(futures)
        dt = time.perf_counter() - t0
        check(sum(results) == n * (n + 1) // 2, f"sum of {n} submits")
        return {"seconds": dt, "tasks_per_s": n / dt}

    return _timed(ex, n, workers, body)


def case_sleep(ex, n, workers):
    def body():
        t0 = time.perf_counter()
        results = list(ex.map(sleep_then_return, range(n), 1))
        dt = time.perf_counter() - t0
        check(results == list(range(n)), "sleep results in order")
        ideal = n * SLEEP_SECONDS / workers
        return {"seconds": dt, "ideal_s": ideal, "efficiency": ideal / dt}

    return _timed(ex, n, workers, body)


def case_arrays(ex, n, workers):
    import numpy as np

    # Random data: Dask compresses frames, and constant arrays would flatter it.
    arrays = [np.random.default_rng(i).random(1_000_000) for i in range(n)]  # 8 MB each
    expected = [float(a.sum()) for a in arrays]
    megabytes = sum(a.nbytes for a in arrays) / 1e6

    def body():
        t0 = time.perf_counter()
        results = list(ex.map(array_sum, arrays, 1))
        dt = time.perf_counter() - t0
        check(
            all(math.isclose(r, e, rel_tol=1e-12) for r, e in zip(results, expected)),
            "array sums",
        )
        return {"seconds": dt, "megabytes": megabytes, "mb_per_s": megabytes / dt}

    return _timed(ex, n, workers, body)


def case_rss(ex, n, workers):
    import resource

    def body():
        exact = _reset_peak_rss()
        before_kb = _status_kb("VmRSS")
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        total = 0
        for r in ex.map(inc, range(n), n):
            total += r
        dt = time.perf_counter() - t0
        if exact:
            growth_kb = _status_kb("VmHWM") - before_kb
        else:  # peak over the whole life of the process: a lower bound
            growth_kb = (
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before
            )
        check(total == n * (n + 1) // 2, f"sum of inc over range({n})")
        return {
            "seconds": dt,
            "items_per_s": n / dt,
            "rss_growth_mb": growth_kb / 1024,
            "rss_before_mb": before_kb / 1024,
            "rss_exact": exact,
        }

    return _timed(ex, n, workers, body)


def uneven_durations(n):
    """The uneven-calls case's five distributions of ``n`` call durations
    (s), named; for n = 200 the one-slow-call ones slow the 11th and the
    151st call."""
    early, late = n * 10 // 200, n * 150 // 200
    sigma = 0.8  # log-normal with mean SLEEP_SECONDS
    mu = math.log(SLEEP_SECONDS) - sigma**2 / 2
    rng = random.Random(19)  # the same durations in every run
    return {
        "all_50ms": [SLEEP_SECONDS] * n,
        "early_1s": [1.0 if i == early else SLEEP_SECONDS for i in range(n)],
        "late_1s": [1.0 if i == late else SLEEP_SECONDS for i in range(n)],
        "rising": [0.01 + 0.05 * i / max(1, n - 1) for i in range(n)],
        "lognormal": [rng.lognormvariate(mu, sigma) for _ in range(n)],
    }


def case_uneven(ex, n, workers):
    """Each distribution as one ``map(sleep_for, durations)`` (chunksize 1),
    back to back in one executor: efficiency = (sum ÷ workers) ÷ actual."""

    def body():
        out = {}
        for name, durations in uneven_durations(n).items():
            t0 = time.perf_counter()
            results = list(ex.map(sleep_for, durations, 1))
            dt = time.perf_counter() - t0
            check(results == durations, f"{name}: results in order")
            out[f"eff_{name}"] = sum(durations) / workers / dt
            out[f"seconds_{name}"] = dt
        return out

    return _timed(ex, n, workers, body)


#: Items of the chunksize case: ``map(inc, range(CHUNKED_ITEMS), chunksize=N)``.
CHUNKED_ITEMS = 100_000


def case_chunksize(ex, n, workers):
    def start_map():
        return ex.map_chunks(inc, range(CHUNKED_ITEMS), n)

    return _timed(ex, n, workers, lambda: _inc_rate(start_map, CHUNKED_ITEMS))


def case_results(ex, n, workers):
    """N calls, each returning a fresh 8 MB array: MB/s of results."""
    base = random_block()

    def body():
        t0 = time.perf_counter()
        results = list(ex.map(block_plus, range(n), 1))
        dt = time.perf_counter() - t0
        megabytes = sum(r.nbytes for r in results) / 1e6
        check(
            all((r == base + i).all() for i, r in enumerate(results)),
            "8 MB results",
        )
        return {"seconds": dt, "megabytes": megabytes, "mb_per_s": megabytes / dt}

    return _timed(ex, n, workers, body)


def case_pss(ex, n, workers):
    """An idle cluster of N workers: the PSS summed over every process this
    one started (not this process, the client), after a warm-up."""
    if not Path("/proc/self/smaps_rollup").exists():
        raise Unsupported("skipped: no /proc/PID/smaps_rollup (Linux >= 4.14)")
    ex.load()
    ex.start(n)
    try:
        warm_up(ex, n)
        procs = _settled_descendants()
        total_kb = 0
        for p in procs:
            total_kb += _pss_kb(p.pid)
        check(len(procs) >= n, f"{len(procs)} processes for {n} workers")
        return {
            "pss_mb": total_kb / 1024,
            "pss_per_worker_mb": total_kb / 1024 / n,
            "processes": float(len(procs)),
            "client_pss_mb": _pss_kb("self") / 1024,
        }
    finally:
        ex.close()


CASES = {
    "startup": case_startup,
    "map": case_map,
    "submit": case_submit,
    "sleep": case_sleep,
    "arrays": case_arrays,
    "rss": case_rss,
    "uneven": case_uneven,
    "chunksize": case_chunksize,
    "results": case_results,
    "pss": case_pss,
}


def main(argv):
    executor, case, n = argv[0], argv[1], int(argv[2])
    workers = int(argv[3]) if len(argv) > 3 else 2
    try:
        result = CASES[case](EXECUTORS[executor](), n, workers)
        result["ok"] = True
    except ModuleNotFoundError as exc:  # an optional competitor or numpy is missing
        result = {"ok": False, "skip": f"skipped: {exc.name} not installed"}
    except Unsupported as exc:
        result = {"ok": False, "skip": str(exc)}
    except Exception as exc:  # noqa: BLE001 -- reported to the parent, which records it
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    print(MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
