"""Exceptions raised by :mod:`sulis_executor`.

Each one subclasses the builtin or standard-library exception that code
written for :class:`concurrent.futures.ProcessPoolExecutor` already catches::

    Exception
    ├── concurrent.futures.BrokenExecutor
    │   └── concurrent.futures.process.BrokenProcessPool
    │       ├── BrokenSulisExecutor     the executor cannot run work any more
    │       │                           (failed initializer, lost scheduler)
    │       ├── WorkerDiedError         a task's worker died (each time it was
    │       │                           tried); the executor stays usable
    │       └── UnpicklingFailedError   a call could not be unpickled on its
    │                                   worker, or its result here; only that
    │                                   call fails, the executor stays usable
    ├── pickle.PicklingError + TypeError
    │   └── UnpicklableError            pickling raised KeyboardInterrupt or
    │                                   SystemExit (kept as ``__cause__``), or
    │                                   the object was a SulisDaskExecutor
    ├── TimeoutError
    │   ├── ClusterStartupTimeout       workers or a scheduler did not arrive
    │   │                               within ``timeout=``
    │   └── WalltimeExceeded            a call never started: the job's time
    │                                   limit was near, or SIGUSR1 came
    ├── RuntimeError
    │   └── VersionMismatchError        a worker runs another version of
    │                                   sulis_executor than the client
    └── RemoteTraceback                 attached as ``__cause__`` of exceptions
                                        re-raised from a worker

An error raised while pickling a call's function or arguments, or a call's
result on its worker, keeps its own type, as with ``ProcessPoolExecutor``
(a ``TypeError`` for a lock, a ``ZeroDivisionError`` raised by a
``__reduce__``), with a note (PEP 678, ``__notes__``) naming the culprit:
which argument of which function, or which result, and its type.
"""

from __future__ import annotations

import pickle
import sys
from concurrent.futures.process import BrokenProcessPool

__all__ = [
    "BrokenSulisExecutor",
    "ClusterStartupTimeout",
    "RemoteTraceback",
    "UnpicklableError",
    "UnpicklingFailedError",
    "VersionMismatchError",
    "WalltimeExceeded",
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


class UnpicklingFailedError(BrokenProcessPool):
    """A call could not be unpickled on its worker, or its result in this
    process: rebuilding an object there raised (a module the other side
    cannot import, a class that differs there, a ``__reduce__`` or
    ``__setstate__`` that raises). The error it raised, whatever it was, even
    ``SystemExit`` or ``KeyboardInterrupt``, is the ``__cause__``.

    ``ProcessPoolExecutor`` breaks the whole pool on such an error (and a
    ``SystemExit`` raised rebuilding a call ends its worker); here only the
    call concerned fails, or the ``map`` chunk, so ``map`` raises there.
    The other calls, even those sent in the same batch, complete, and the
    executor stays usable.
    """


class UnpicklableError(pickle.PicklingError, TypeError):
    """Pickling an object raised ``KeyboardInterrupt`` or ``SystemExit``
    (a ``__reduce__`` can), which is its ``__cause__`` (or, for a result on
    a worker, is named in the message): the future fails with this instead,
    so that ``result()`` cannot end the caller's script. Pickling a
    :class:`SulisDaskExecutor` (to use it inside its own task) raises it too.

    Any other pickling error keeps its own type, as with
    ``ProcessPoolExecutor``, with a note naming the culprit.

    It subclasses both :class:`pickle.PicklingError` and :class:`TypeError`
    because ``ProcessPoolExecutor`` raises either, depending on the object.
    """


class ClusterStartupTimeout(TimeoutError):
    """The scheduler or the expected workers did not arrive in time."""


class WalltimeExceeded(TimeoutError):
    """A call that never started: the SLURM job's time limit was too near
    (``walltime_margin``), or SIGUSR1 warned of its end. Running calls
    finished; the message says how many calls finished and how many did not
    start. A ``map`` iterator raises it at its first item that never ran.
    ``concurrent.futures.TimeoutError`` is ``TimeoutError``: handlers of
    either catch it."""


class VersionMismatchError(RuntimeError):
    """A worker runs another version of ``sulis_executor`` than this client
    (or none), so it cannot be trusted to run the client's calls: raised by
    the constructor, naming the worker and both versions. A scheduler the
    executor started refuses such a worker as it registers; workers of a
    cluster you run are checked when the executor starts."""


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


def add_note(error: BaseException, note: str) -> None:
    """Add a PEP 678 note to ``error``; on Python 3.10, which has no
    ``add_note``, set ``__notes__`` (which 3.11+ tracebacks print) as it would."""
    try:
        if sys.version_info >= (3, 11):
            error.add_note(note)
        else:
            setattr(error, "__notes__", [*getattr(error, "__notes__", ()), note])  # noqa: B010
    except (AttributeError, TypeError):  # an exception that refuses attributes
        pass
