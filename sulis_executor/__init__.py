"""A drop-in `concurrent.futures` executor that runs on Dask, inside SLURM or not.

    from sulis_executor import SulisDaskExecutor   # was: ProcessPoolExecutor
    with SulisDaskExecutor() as ex:
        results = list(ex.map(f, inputs))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._progress import progress as progress
    from ._walltime import requeue as requeue
    from .errors import BrokenSulisExecutor as BrokenSulisExecutor
    from .errors import ClusterStartupTimeout as ClusterStartupTimeout
    from .errors import RemoteTraceback as RemoteTraceback
    from .errors import UnpicklableError as UnpicklableError
    from .errors import UnpicklingFailedError as UnpicklingFailedError
    from .errors import VersionMismatchError as VersionMismatchError
    from .errors import WalltimeExceeded as WalltimeExceeded
    from .errors import WorkerDiedError as WorkerDiedError
    from .executor import SulisDaskExecutor as SulisDaskExecutor

# Public names are imported on first use (PEP 562): a worker process, which
# runs ``python -m sulis_executor.worker``, imports this package too, and its
# start-up time is part of the executor's.
_EXPORTS = {
    "BrokenSulisExecutor": ".errors",
    "ClusterStartupTimeout": ".errors",
    "RemoteTraceback": ".errors",
    "SulisDaskExecutor": ".executor",
    "UnpicklableError": ".errors",
    "UnpicklingFailedError": ".errors",
    "VersionMismatchError": ".errors",
    "WalltimeExceeded": ".errors",
    "WorkerDiedError": ".errors",
    "progress": "._progress",
    "requeue": "._walltime",
}

__all__ = sorted(_EXPORTS)

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
