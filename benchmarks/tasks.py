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
