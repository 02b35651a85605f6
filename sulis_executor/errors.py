"""Exceptions raised by :mod:`sulis_executor`.

Each one subclasses the builtin or standard-library exception that code
written for :class:`concurrent.futures.ProcessPoolExecutor` already catches::

    Exception
    ├── concurrent.futures.BrokenExecutor
    │   └── concurrent.futures.process.BrokenProcessPool
    │       ├── BrokenSulisExecutor     the executor cannot run work any more
    │       │                           (failed initializer, lost scheduler)
    │       └── WorkerDiedError         a task's worker died (each time it was
    │                                   tried); the executor stays usable
    ├── pickle.PicklingError + TypeError
    │   └── UnpicklableError            an argument, function or result could
    │                                   not be pickled; names the culprit
    ├── TimeoutError
    │   └── ClusterStartupTimeout       workers or a scheduler did not arrive
    │                                   within ``timeout=``
    └── RemoteTraceback                 attached as ``__cause__`` of exceptions
                                        re-raised from a worker
"""

from __future__ import annotations

import pickle
from concurrent.futures.process import BrokenProcessPool

__all__ = [
    "BrokenSulisExecutor",
    "ClusterStartupTimeout",
    "RemoteTraceback",
    "UnpicklableError",
    "WorkerDiedError",
]


class BrokenSulisExecutor(BrokenProcessPool):
    """The executor can no longer run work: pending futures fail with this and
    later calls to ``submit`` or ``map`` raise it."""


class WorkerDiedError(BrokenProcessPool):
    """A worker process died while running this task, every time Dask tried it.

    Unlike :class:`~concurrent.futures.ProcessPoolExecutor`, only the task
    concerned fails: the other tasks complete and the executor stays usable.
    """


class UnpicklableError(pickle.PicklingError, TypeError):
    """An object that has to cross a process boundary could not be pickled.

    It subclasses both :class:`pickle.PicklingError` and :class:`TypeError`
    because ``ProcessPoolExecutor`` raises either, depending on the object.
    """


class ClusterStartupTimeout(TimeoutError):
    """The scheduler or the expected workers did not arrive in time."""


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker.

    Chained as ``__cause__`` so that the default traceback printout shows where
    the error happened on the cluster, as ``ProcessPoolExecutor`` does.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
