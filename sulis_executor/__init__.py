"""A drop-in `concurrent.futures` executor that runs on Dask, inside SLURM or not.

    from sulis_executor import SulisDaskExecutor   # was: ProcessPoolExecutor
    with SulisDaskExecutor() as ex:
        results = list(ex.map(f, inputs))
"""

from __future__ import annotations

from ._progress import progress
from .errors import (
    BrokenSulisExecutor,
    ClusterStartupTimeout,
    RemoteTraceback,
    UnpicklableError,
    WorkerDiedError,
)
from .executor import SulisDaskExecutor

__all__ = [
    "BrokenSulisExecutor",
    "ClusterStartupTimeout",
    "RemoteTraceback",
    "SulisDaskExecutor",
    "UnpicklableError",
    "WorkerDiedError",
    "progress",
]

__version__ = "0.1.0"
