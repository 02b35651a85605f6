"""The functions the benchmarks run remotely.

They live in an importable module (not ``__main__``) so that every executor,
including Dask workers and mpi4py.futures workers, pickles them by reference.
"""

import time

SLEEP_SECONDS = 0.05


def inc(x):
    return x + 1


def sleep_then_return(x):
    time.sleep(SLEEP_SECONDS)
    return x


def array_sum(array):
    return float(array.sum())


def sleep_for(seconds):
    """A call that takes ``seconds`` (the uneven-calls case)."""
    time.sleep(seconds)
    return seconds


#: Per worker process: one random 8 MB block, made on first use, so that
#: the large-results case times sending results, not making random numbers.
_BLOCK = []


def random_block(seed=0):
    import numpy as np

    return np.random.default_rng(seed).random(1_000_000)  # 8 MB of float64


def block_plus(i):
    """A fresh 8 MB array: this process's random block plus ``i`` (random
    data: Dask compresses frames, and constant arrays would flatter it)."""
    if not _BLOCK:
        _BLOCK.append(random_block())
    return _BLOCK[0] + i
