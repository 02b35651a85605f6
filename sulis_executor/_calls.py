"""Calls and batches, as the engine keeps them, and the errors that name them.

A :class:`Call` is one future the user (or ``map``) waits on; a
:class:`Batch` is what travels to the cluster as one unit: several
submitted calls, or map chunks. The error builders here say which call,
argument or item is to blame when pickling or unpickling fails.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, InvalidStateError
from typing import Any

import cloudpickle

from . import _remote
from ._shared import Pickled
from .errors import RemoteTraceback, UnpicklableError, UnpicklingFailedError, add_note

#: Guards the one call of ``set_running_or_notify_cancel`` each future gets
#: (see :meth:`Call.notify`); held for an instant, never across a callback.
_notify_lock = threading.Lock()


class Call:
    """One future the user (or ``map``) waits on.

    For ``submit`` the body is ``(fn, args, kwargs)``; for a ``map`` chunk it
    is ``(fn, [args, ...])`` and the future's result is the list of outcomes.
    ``notified`` records that ``set_running_or_notify_cancel`` was called,
    which must happen exactly once per future.
    """

    __slots__ = ("future", "kind", "body", "notified", "batch", "first_index", "timing", "expected")

    def __init__(self, kind: str, body: Any, first_index: int = 0,
                 timing: CallTiming | None = None, expected: float | None = None) -> None:
        self.future: Future[Any] = Future()
        self.kind = kind
        self.body = body
        self.notified = False
        self.batch: Batch | None = None
        self.first_index = first_index
        # Set for the chunks of a map with an explicit chunksize: those
        # measured short travel together (see _take_batch_locked).
        self.timing = timing
        # Seconds the call should take on a worker, when measured: an
        # automatic map chunk's items times its map's seconds per item (the
        # others are read from their timing, see expected_seconds).
        self.expected = expected

    def notify(self) -> bool:
        """Move a pending future to RUNNING (True), or tell the waiters of a
        cancelled one (False): exactly once per future, whoever asks first
        (the sender taking it, the settler, a cancellation)."""
        with _notify_lock:  # set_running_or_notify_cancel runs no callback
            if self.notified:
                return self.future.running()
            self.notified = True
            return self.future.set_running_or_notify_cancel()

    def on_done(self, future: Future[Any]) -> None:
        """The future's done callback: one cancelled while queued tells its
        waiters (``wait``, ``as_completed``) now, as the sender skips it."""
        if future.cancelled():
            self.notify()

    def set(self, value: Any, error: bool = False) -> None:
        """Settle the future with ``value`` (an exception if ``error``),
        unless it was cancelled or settled already; then let go of the
        arguments and the batch, so that the result and the inputs go as soon
        as the caller lets go of them."""
        if self.notify():
            try:
                if error:
                    self.future.set_exception(value)
                else:
                    self.future.set_result(value)
            except InvalidStateError:  # settled already, e.g. by a broken executor
                pass
        self.batch = None
        self.body = None


class CallTiming:
    """Seconds per call on a worker, as measured so far (an exponential
    average), which sizes batches: the engine keeps one for submitted calls,
    and each ``map`` whose chunks may travel together keeps its own, since
    another's chunks, even of the same function, may take far longer."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds: float | None = None

    def observe(self, seconds: float) -> None:
        self.seconds = seconds if self.seconds is None else 0.7 * self.seconds + 0.3 * seconds


class Batch:
    """What travels to the cluster as one unit (a Dask task, or a handout to
    a node's agent): several submitted calls, or map chunks (one, or several
    of an explicit ``chunksize``)."""

    __slots__ = ("batch_id", "kind", "calls", "dask_future", "name", "shared_keys", "pickled",
                 "deaths", "fetching", "expected")

    def __init__(self, batch_id: str, kind: str, calls: list[Call], name: str) -> None:
        self.batch_id = batch_id
        self.kind = kind
        self.calls = calls
        self.dask_future: Any = None
        self.name = name
        self.shared_keys: tuple[str, ...] = ()
        # Batches for agents (see _dispatch): their pickled calls, and how
        # many workers died running them.
        self.pickled: Pickled | None = None
        self.deaths = 0
        # Its task finished, and its result is being fetched (see _tasks).
        self.fetching = False
        # Seconds it should take on a worker, if every call was measured
        # (see expected_seconds): a short one may wait in a node's pool.
        self.expected: float | None = None


    def settle(self, error: BaseException) -> None:
        """Fail every call of the batch with ``error``."""
        for call in self.calls:
            call.set(error, error=True)


def expected_seconds(calls: list[Call], call_timing: CallTiming) -> float | None:
    """How long these calls should take together on a worker, from what
    was measured (``call_timing``: the executor's submitted calls); ``None``
    if any of them has not been measured yet."""
    total = 0.0
    for call in calls:
        seconds: float | None
        if call.expected is not None:
            seconds = call.expected
        elif call.timing is not None:  # a chunk of an explicit chunksize
            seconds = call.timing.seconds
        elif call.kind == _remote.CALLS:
            seconds = call_timing.seconds
        else:
            seconds = None
        if seconds is None:
            return None
        total += seconds
    return total


def rebuild_exception(error: BaseException, tb: str) -> BaseException:
    if tb:
        error.__cause__ = RemoteTraceback(tb)
    return error


def _describe(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}".removeprefix("builtins.")


def function_name(fn: object) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return "".join(c if c.isalnum() or c in "_." else "_" for c in name)[:60] or "call"


def _suspects(call: Call) -> list[tuple[str, object]]:
    """The parts of a call to blame, each described, if it fails to pickle."""
    fn = call.body[0]
    name = function_name(fn)
    suspects: list[tuple[str, object]] = [(f"the function {fn!r}", fn)]
    if call.kind == _remote.CALLS:
        _, args, kwargs = call.body
        suspects += [(f"positional argument {i} of {name}()", a) for i, a in enumerate(args)]
        suspects += [(f"keyword argument {k!r} of {name}()", v) for k, v in kwargs.items()]
    else:
        _, chunk, star = call.body
        for offset, args in enumerate(chunk):
            item = call.first_index + offset
            if not star:
                args = (args,)
            suspects += [(f"argument {j} of item {item} given to map({name})", a) for j, a in enumerate(args)]
    return suspects


def pickling_error(call: Call, error: BaseException) -> BaseException:
    """What fails a call whose pickling raised ``error``: that error itself,
    keeping its type as with ``ProcessPoolExecutor``, with a note naming the
    culprit; a ``KeyboardInterrupt`` or ``SystemExit`` (a ``__reduce__``
    raised it in the collector thread) would end the caller's script from
    ``result()``, so it becomes the ``__cause__`` of an ``UnpicklableError``."""
    note = _culprit(call, error)
    if isinstance(error, Exception):
        add_note(error, note)
        return error
    failure = UnpicklableError(note)
    failure.__cause__ = error
    return failure


def _culprit(call: Call, error: BaseException) -> str:
    """Which part of the call cannot be pickled, found by pickling each alone."""
    for label, obj in _suspects(call):
        try:
            cloudpickle.dumps(obj)
        except BaseException as inner:
            if not isinstance(inner, Exception) and not isinstance(error, type(inner)):
                raise  # a Ctrl-C while looking for the culprit, not the culprit
            return (f"{label}, of type {_describe(obj)}, cannot be pickled to send it to a "
                    f"worker. Pass picklable objects (module-level functions, plain data), or "
                    f"create this object inside the task.")
    return f"the call to {function_name(call.body[0])}() could not be pickled to send it to a worker"


#: An outcome (see ``_remote``) for a call whose result could not be
#: unpickled here: ``(UNREADABLE_HERE, error, "")``.
UNREADABLE_HERE = -1


def unpickling_failed(call: Call, outcome: Any, name: str) -> UnpicklingFailedError:
    """What fails a call (or a map chunk) that could not be unpickled on its
    worker, or whose result could not be unpickled here: the error that
    unpickling raised, whatever it was, is the ``__cause__``. ``name`` is
    the function's, should the call have been settled meanwhile."""
    tag, error, tb = outcome
    if call.body is not None:
        name = function_name(call.body[0])
    if call.kind == _remote.CALLS:
        call_is, result_is = f"the call to {name}()", f"the result of {name}()"
    elif call.body is not None:
        first, last = call.first_index, call.first_index + len(call.body[1]) - 1
        items = f"item {first}" if first == last else f"items {first}-{last}"
        call_is, result_is = f"{items} given to map({name})", f"the results of {items} of map({name})"
    else:
        call_is, result_is = f"a chunk of map({name})", f"the results of a chunk of map({name})"
    raised = f"{type(error).__name__}: {error}"
    if tag == _remote.UNREADABLE:
        message = (f"{call_is} could not be unpickled on its worker ({raised}); its function and "
                   f"arguments must rebuild there: the workers need the modules they come from, "
                   f"in the same versions, and no __reduce__ or __setstate__ may raise.")
    else:
        message = (f"{result_is} could not be unpickled here ({raised}); it must rebuild in this "
                   f"process: this process needs the modules it comes from, in the same versions, "
                   f"and no __reduce__ or __setstate__ may raise.")
    failure = UnpicklingFailedError(f"{message} The other calls and the executor are not affected.")
    failure.__cause__ = rebuild_exception(error, tb)
    return failure
