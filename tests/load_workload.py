"""Realistic load, and arguments and results on every side of every size
threshold the executor has: the batches whose form depends on their size,
or on what they were grouped with, must reach and run in whatever takes
them (a node's pool, a Dask task).

Used by tests/test_executor.py on local clusters, and, as a job script
(``python -m tests.load_workload``), by tests/slurm/test_load_slurm.py,
through ``LOAD_EXECUTORS`` executors in a row: as the batch script's plain
``python`` (srun mode) or under ``srun --mpi=pmi2`` (MPI mode: one
executor; rank 0 runs the script). The job prints one ``RESULT {...}``
line: for each check, how many calls gave a wrong result or failed, and
the first failure's text.
"""

from __future__ import annotations

import functools
import os
import random
import threading
import time
import traceback
from concurrent.futures import as_completed

from sulis_executor import SulisDaskExecutor
from sulis_executor._shared import SHARE_THRESHOLD

BURST_INCS = int(os.environ.get("LOAD_BURST_INCS", "20000"))
BURST_BLOBS = int(os.environ.get("LOAD_BURST_BLOBS", "3000"))
EXECUTORS = int(os.environ.get("LOAD_EXECUTORS", "3"))
#: Every size threshold of the executor, and one byte either side of it.
AROUND = sorted({SHARE_THRESHOLD + d for d in (-1, 0, 1)} | {3 * SHARE_THRESHOLD // 2})


def inc(x: int) -> int:
    return x + 1


def size_of(data: object) -> int:
    return len(data)  # type: ignore[arg-type]


def array_of(n: int) -> object:
    """A numpy array of ``n`` bytes: its buffer is pickled out of band, and
    shared once it reaches the threshold (``bytes`` and ``bytearray`` are
    pickled in band, inside the batch)."""
    import numpy

    return numpy.zeros(n, dtype=numpy.uint8)


def make_bytes(n: int) -> bytes:
    return b"\x05" * n


def shared_plus(big: object, i: int) -> int:
    return len(big) + i


def slow_identity(x: int, seconds: float) -> int:
    time.sleep(seconds)  # stands for work
    return x


class Failures:
    """Per check: calls that failed or gave a wrong answer, and the first
    failure's text."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def check(self, name: str, outcome: object, expected: object) -> None:
        """``outcome``: a future, or a function that computes the value."""
        self.counts.setdefault(name, 0)
        try:
            got = outcome.result(timeout=120) if hasattr(outcome, "result") else outcome()  # type: ignore[operator]
            if got != expected:
                raise AssertionError(f"expected {expected!r:.60}, got {got!r:.60}")
        except BaseException as error:  # noqa: B036 - counted and reported
            self.counts[name] += 1
            if name not in self.first:
                self.first[name] = "".join(traceback.format_exception_only(error)).strip()[-400:]


def burst(ex: SulisDaskExecutor, failures: Failures, rng: random.Random,
          incs: int = BURST_INCS, blobs: int = BURST_BLOBS) -> int:
    """Tens of thousands of submits at once, tiny calls mixed with calls
    whose arguments are a few kB, read back as they complete."""
    expected = {}
    for i in range(incs + blobs):
        if blobs and i % ((incs + blobs) // blobs) == 0:
            n = rng.randrange(1000, 6001)
            expected[ex.submit(size_of, os.urandom(n))] = n
        else:
            expected[ex.submit(inc, i)] = i + 1
    for future in as_completed(expected, timeout=300):
        failures.check("burst", future, expected[future])
    return len(expected)


def boundaries(ex: SulisDaskExecutor, failures: Failures) -> None:
    """One call at a time and several together, at each size threshold:
    arguments pickled in band (bytes) and out of band (arrays), and results."""
    for n in AROUND:
        failures.check(f"bytes argument of {n}", ex.submit(size_of, bytes(n)), n)
        failures.check(f"array argument of {n}", ex.submit(size_of, array_of(n)), n)
        failures.check(f"result of {n}", ex.submit(make_bytes, n), make_bytes(n))
    # Several together: batches whose calls are small but whose whole is not.
    together = [ex.submit(size_of, bytes(n)) for n in AROUND for _ in range(3)]
    for future, n in zip(together, [n for n in AROUND for _ in range(3)]):
        failures.check("bytes arguments together", future, n)
    big = array_of(SHARE_THRESHOLD + 1)
    failures.check("map with a shared argument, chunksize=10",
                   lambda: list(ex.map(functools.partial(shared_plus, big), range(200), chunksize=10)),
                   [len(big) + i for i in range(200)])
    failures.check("map with a shared argument",
                   lambda: list(ex.map(functools.partial(shared_plus, big), range(200))),
                   [len(big) + i for i in range(200)])
    failures.check("map of arguments around the thresholds",
                   lambda: list(ex.map(size_of, [bytes(n) for n in AROUND] * 2)), AROUND * 2)
    failures.check("map with chunksize=3 around the thresholds",
                   lambda: list(ex.map(size_of, [bytes(n) for n in AROUND] * 2, chunksize=3)), AROUND * 2)


def large_argument_during_a_long_map(ex: SulisDaskExecutor, failures: Failures) -> None:
    """A call with a shared buffer, while a long map keeps every worker busy,
    runs before the map ends (where the buffer is Dask data, the call is a
    task, and needs a member of the pool the map keeps busy)."""
    items = 500 * max(1, ex.num_workers)
    results = ex.map(slow_identity, range(items), [0.005] * items)
    seen: list[int] = []
    consumer = threading.Thread(target=seen.extend, args=(results,))
    consumer.start()
    try:
        deadline = time.monotonic() + 60
        while len(seen) < 50 and consumer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)  # polling, not synchronising: the map runs regardless
        failures.check("a large argument during a long map",
                       ex.submit(size_of, array_of(2 * SHARE_THRESHOLD)), 2 * SHARE_THRESHOLD)
        failures.check("... ran before the map ended", lambda: len(seen) < items, True)
    finally:
        consumer.join(120)
    failures.check("the long map", lambda: seen, list(range(items)))


def main() -> None:
    from examples._common import report

    rng = random.Random(1234)
    failures = Failures()
    calls = 0
    modes = []
    workers = []
    for _ in range(EXECUTORS):
        with SulisDaskExecutor() as ex:
            modes.append(ex.launch_mode)
            workers.append(ex.num_workers)
            calls += burst(ex, failures, rng)
            boundaries(ex, failures)
            large_argument_during_a_long_map(ex, failures)
    failed = {name: count for name, count in failures.counts.items() if count}
    report(modes=modes, workers=workers, calls=calls, sizes=AROUND, checks=len(failures.counts),
           failed=failed, first=failures.first)


if __name__ == "__main__":
    main()
