"""The client-side machinery behind :class:`SulisDaskExecutor`.

An :class:`Engine` owns the Dask client and the launcher. It turns batches of
calls into cluster tasks, and cluster outcomes back into
:class:`concurrent.futures.Future` states. It is kept apart from the executor
object on purpose: threads and callbacks refer to the engine only, so an
executor that is dropped can be garbage collected and its finalizer can shut
the engine down.

Locking rule: ``Engine._lock`` guards the bookkeeping only, and is never held
across a call into the Dask client, whose event loop thread takes the same
lock in the "running" event handler.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future, InvalidStateError
from typing import Any

import cloudpickle

from . import _remote
from .errors import BrokenSulisExecutor, RemoteTraceback, UnpicklableError, WorkerDiedError

logger = logging.getLogger("sulis_executor")

_STOP = object()

#: Payloads above this size are scattered to the cluster rather than embedded
#: in the task graph: the scheduler then never holds them, and Dask does not
#: warn about "large graphs".
SCATTER_THRESHOLD = 1_000_000


class Call:
    """One future the user (or ``map``) waits on, and whether the executor
    has already called ``set_running_or_notify_cancel`` on it."""

    __slots__ = ("future", "notified", "batch")

    def __init__(self) -> None:
        self.future: Future[Any] = Future()
        self.notified = False
        self.batch: Batch | None = None


class Batch:
    """A cluster task: several calls (kind CALLS) or one map chunk (CHUNK)."""

    __slots__ = ("batch_id", "kind", "calls", "dask_future", "live", "name")

    def __init__(self, batch_id: str, kind: str, calls: list[Call], name: str) -> None:
        self.batch_id = batch_id
        self.kind = kind
        self.calls = calls
        self.dask_future: Any = None
        self.live = len(calls)
        self.name = name


def rebuild_exception(error: BaseException, tb: str) -> BaseException:
    if tb:
        error.__cause__ = RemoteTraceback(tb)
    return error


def _describe(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}".removeprefix("builtins.")


def _find_unpicklable(labelled: list[tuple[str, object]]) -> tuple[str, object, Exception] | None:
    for label, obj in labelled:
        try:
            cloudpickle.dumps(obj)
        except Exception as error:
            return label, obj, error
    return None


def pickle_payload(kind: str, body: Any, labelled: list[tuple[str, object]]) -> bytes:
    """Pickle a batch, or raise :class:`UnpicklableError` naming the culprit.

    ``labelled`` lists the parts to blame, each with a human description,
    tried one by one only once pickling the whole has failed.
    """
    try:
        return cloudpickle.dumps((kind, body))
    except Exception as error:
        culprit = _find_unpicklable(labelled)
        if culprit is None:
            raise UnpicklableError(f"the task could not be pickled: {error}") from error
        label, obj, inner = culprit
        raise UnpicklableError(
            f"{label}, of type {_describe(obj)}, cannot be pickled to send it to a worker "
            f"({inner}). Pass picklable objects (module-level functions, plain data), "
            f"or create this object inside the task."
        ) from inner


def _function_name(fn: object) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return "".join(c if c.isalnum() or c in "_." else "_" for c in name)[:60] or "call"


class Engine:
    """Submits batches to a Dask cluster and settles their futures."""

    def __init__(self, client: Any, launcher: Any, token: str, has_initializer: bool) -> None:
        self.client = client
        self.launcher = launcher
        self.token = token
        self.has_initializer = has_initializer
        self.broken: str | None = None
        self._lock = threading.Lock()
        self._batches: dict[str, Batch] = {}
        self._done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._counter = itertools.count()
        self._closed = False
        self._close_lock = threading.Lock()
        client.subscribe_topic(_remote.running_topic(token), self._on_running_event)
        self._collector = threading.Thread(
            target=self._collect_loop, name=f"sulis-executor-results-{token[:8]}", daemon=True
        )
        self._collector.start()

    # -- submitting -------------------------------------------------------

    def submit_calls(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[Any]:
        call = Call()
        labelled: list[tuple[str, object]] = [(f"the function {fn!r}", fn)]
        labelled += [(f"positional argument {i} of {_function_name(fn)}()", a) for i, a in enumerate(args)]
        labelled += [(f"keyword argument {k!r} of {_function_name(fn)}()", v) for k, v in kwargs.items()]
        self._dispatch(_remote.CALLS, [(fn, args, kwargs)], [call], _function_name(fn), labelled)
        return call.future

    def submit_chunk(self, fn: Any, chunk: list[tuple[Any, ...]], first_index: int) -> Future[Any]:
        """Run ``fn`` over ``chunk``; the future's result is the outcomes list."""
        call = Call()
        labelled: list[tuple[str, object]] = [(f"the function {fn!r}", fn)]
        for offset, args in enumerate(chunk):
            labelled += [
                (f"argument {j} of item {first_index + offset} passed to map()", a)
                for j, a in enumerate(args)
            ]
        self._dispatch(_remote.CHUNK, (fn, chunk), [call], _function_name(fn), labelled)
        return call.future

    def _dispatch(
        self, kind: str, body: Any, calls: list[Call], name: str, labelled: list[tuple[str, object]]
    ) -> None:
        batch = Batch(f"{name}-{next(self._counter)}-{uuid.uuid4().hex[:12]}", kind, calls, name)
        for call in calls:
            call.batch = batch
            call.future.add_done_callback(lambda _, call=call: self._on_call_done(call))
        try:
            payload: Any = pickle_payload(kind, body, labelled)
        except UnpicklableError as error:
            self._settle(batch, error)
            return
        with self._lock:
            self._batches[batch.batch_id] = batch
        try:
            if len(payload) > SCATTER_THRESHOLD:
                payload = self.client.scatter(payload, hash=False, direct=False)
            dask_future = self.client.submit(
                _remote.run_batch,
                payload,
                batch.batch_id,
                self.token,
                self.has_initializer,
                key=batch.batch_id,
                pure=False,
            )
        except Exception as error:
            with self._lock:
                self._batches.pop(batch.batch_id, None)
            self._settle(batch, BrokenSulisExecutor(f"could not submit to the cluster: {error}"))
            return
        batch.dask_future = dask_future
        dask_future.add_done_callback(self._done.put)

    # -- events from the cluster -----------------------------------------

    def _on_running_event(self, event: tuple[float, str]) -> None:
        # Runs on the client's event loop: bookkeeping only, no client calls.
        _, batch_id = event
        with self._lock:
            batch = self._batches.get(batch_id)
            if batch is not None:
                for call in batch.calls:
                    self._notify_locked(call)

    def _notify_locked(self, call: Call) -> bool:
        """Move a pending future to RUNNING (True), or tell the waiters of a
        cancelled one (False). Exactly once per future, under ``_lock``."""
        if call.notified:
            return call.future.running()
        call.notified = True
        return call.future.set_running_or_notify_cancel()

    def _on_call_done(self, call: Call) -> None:
        # Runs in whichever thread finished or cancelled the future.
        if not call.future.cancelled():
            return
        to_cancel = None
        with self._lock:
            self._notify_locked(call)
            batch = call.batch
            if batch is not None and self._batches.get(batch.batch_id) is batch:
                batch.live -= 1
                if batch.live == 0:
                    del self._batches[batch.batch_id]
                    to_cancel = batch.dask_future
        if to_cancel is not None:
            try:
                to_cancel.cancel()
            except Exception:  # the client may be closing; the task dies with it
                logger.debug("could not cancel %s", to_cancel.key, exc_info=True)

    # -- results ----------------------------------------------------------

    def _collect_loop(self) -> None:
        while True:
            first = self._done.get()
            items = [first]
            while True:
                try:
                    items.append(self._done.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in items)
            self._collect([item for item in items if item is not _STOP])
            if stop:
                return

    def _collect(self, dask_futures: list[Any]) -> None:
        with self._lock:
            pairs = [(f, self._batches.pop(f.key, None)) for f in dask_futures]
        pairs = [(f, b) for f, b in pairs if b is not None]
        finished = [(f, b) for f, b in pairs if f.status == "finished"]
        if finished:
            try:
                payloads = self.client.gather([f for f, _ in finished])
            except Exception:
                payloads = [self._gather_one(f) for f, _ in finished]
            for (_, batch), payload in zip(finished, payloads):
                self._deliver(batch, payload)
        for dask_future, batch in pairs:
            if dask_future.status != "finished":
                self._settle(batch, self._failure_of(dask_future, batch))
        for dask_future, _ in pairs:
            dask_future.release()

    def _gather_one(self, dask_future: Any) -> Any:
        try:
            return dask_future.result()
        except BaseException as error:
            return error

    def _failure_of(self, dask_future: Any, batch: Batch) -> BaseException:
        from distributed.scheduler import KilledWorker

        if dask_future.status == "error":
            try:
                error = dask_future.exception(timeout=5)
            except Exception as inner:
                error = inner
            if isinstance(error, KilledWorker):
                died = WorkerDiedError(
                    f"task {batch.batch_id} ({batch.name}) failed because the worker running "
                    f"it died, on every one of Dask's attempts (see "
                    f"distributed.scheduler.allowed-failures). A task that crashes its "
                    f"process (os._exit, a segfault, running out of memory) does this."
                )
                died.__cause__ = error
                return died
            return error if isinstance(error, BaseException) else BrokenSulisExecutor(str(error))
        return BrokenSulisExecutor(
            f"task {batch.batch_id} was lost: the connection to the Dask scheduler is gone "
            f"(status {dask_future.status!r})"
        )

    def _deliver(self, batch: Batch, payload: Any) -> None:
        if isinstance(payload, BaseException):
            self._settle(batch, payload)
            return
        outcomes = cloudpickle.loads(payload)
        if outcomes and outcomes[0][0] == _remote.BROKEN:
            _, message, tb = outcomes[0]
            self.mark_broken(message, tb)
            self._settle(batch, self._broken_error())
            return
        if batch.kind == _remote.CHUNK:
            self._set(batch.calls[0], outcomes)
            return
        for call, outcome in zip(batch.calls, outcomes):
            if outcome[0] == _remote.OK:
                self._set(call, outcome[1])
            else:
                self._set(call, rebuild_exception(outcome[1], outcome[2]), error=True)

    def _set(self, call: Call, value: Any, error: bool = False) -> None:
        with self._lock:
            running = self._notify_locked(call)
        if not running:
            return
        try:
            if error:
                call.future.set_exception(value)
            else:
                call.future.set_result(value)
        except InvalidStateError:  # settled already, e.g. broken then delivered
            pass

    def _settle(self, batch: Batch, error: BaseException) -> None:
        for call in batch.calls:
            self._set(call, error, error=True)

    # -- breaking and closing --------------------------------------------

    def _broken_error(self) -> BrokenSulisExecutor:
        error = BrokenSulisExecutor(f"{self.broken}; the executor is not usable any more")
        if getattr(self, "_broken_tb", ""):
            error.__cause__ = RemoteTraceback(self._broken_tb)
        return error

    def mark_broken(self, message: str, tb: str = "") -> None:
        """Fail every pending future and refuse new work, as a broken
        ``ProcessPoolExecutor`` does."""
        with self._lock:
            if self.broken is not None:
                return
            self.broken = message
            self._broken_tb = tb
            pending = list(self._batches.values())
            self._batches.clear()
        for batch in pending:
            self._settle(batch, self._broken_error())
        dask_futures = [b.dask_future for b in pending if b.dask_future is not None]
        if dask_futures:
            try:
                self.client.cancel(dask_futures)
            except Exception:
                logger.debug("could not cancel work of a broken executor", exc_info=True)

    def pending_futures(self) -> list[Future[Any]]:
        with self._lock:
            return [c.future for b in self._batches.values() for c in b.calls]

    def cancel_pending(self) -> None:
        for future in self.pending_futures():
            future.cancel()

    def wait_idle(self) -> None:
        """Block until every future the engine knows of is settled."""
        from concurrent.futures import wait

        while True:
            futures = self.pending_futures()
            if not futures:
                return
            wait(futures)

    def close(self, timeout: float = 10.0) -> None:
        """Release the cluster; idempotent, bounded by ``timeout`` per step."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + timeout
        self._done.put(_STOP)
        self._collector.join(timeout)
        leftovers = self.pending_futures()
        for future in leftovers:
            future.cancel()
        with self._lock:
            stranded = list(self._batches.values())
            self._batches.clear()
        for batch in stranded:
            self._settle(batch, BrokenSulisExecutor("the executor was shut down"))
        try:
            self.client.unsubscribe_topic(_remote.running_topic(self.token))
            self.client.close(timeout=max(1.0, deadline - time.monotonic()))
        except Exception:
            logger.debug("error closing the Dask client", exc_info=True)
        try:
            self.launcher.close(timeout=max(1.0, deadline - time.monotonic()))
        except Exception:
            logger.debug("error closing the cluster", exc_info=True)
