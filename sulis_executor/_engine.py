"""The client-side machinery behind :class:`SulisDaskExecutor`.

An :class:`Engine` owns the Dask client and the launcher. It keeps the work
that was submitted in a queue on the client, sends it to the cluster in
batches, and turns the outcomes back into :class:`concurrent.futures.Future`
states.

Why a client-side queue. ``ProcessPoolExecutor`` keeps a few calls per
worker in flight and the rest in its own queue; only queued calls can be
cancelled, and a call counts as running once it has been handed to a worker.
We do the same, with Dask tasks: at most ``2 x threads`` batches are on the
cluster at once. That keeps every worker busy with one batch running and one
ready, bounds what the scheduler holds however many calls are submitted, and
lets calls that arrive faster than the cluster drains them leave together,
as one cluster task (a task costs Dask about 2 ms; a call in a batch costs a
few microseconds). Batches grow only while measured calls are short, so
long calls still spread one per worker.

Runners. When the scheduler runs in this process (the modes in which the
executor starts its cluster), a batch is not a Dask task of its own: it waits
in ``_ready`` for a runner, a Dask task per worker thread that asks the
scheduler for batch after batch on its worker's stream (``hand_out``, called
on the scheduler's event loop), each request carrying the last batch's
result. That saves the scheduler round trip a task costs between batches.
What a runner holds is tracked per worker, so a batch whose worker dies goes
to another runner, as Dask would run a task again. Batches that need Dask
data (shared buffers) still go as tasks.

The engine is kept apart from the executor object on purpose: threads and
callbacks refer to the engine only, so an executor that is dropped can be
garbage collected, and its finalizer shuts the engine down.

Locking: ``_lock`` guards the queue and the in-flight table and is never held
across a call into the Dask client; ``_send_lock`` serialises sending.
"""

from __future__ import annotations

import collections
import itertools
import logging
import pickle
import queue
import threading
import time
import uuid
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import Any

import cloudpickle

from . import _remote
from ._shared import Pickled, SharedBuffers
from .errors import (
    BrokenSulisExecutor,
    RemoteTraceback,
    UnpicklableError,
    UnpicklingFailedError,
    WorkerDiedError,
    add_note,
)
from .launchers._scheduler import (
    PARKED,
    Handout,
    register_feeder,
    send_handout,
    unregister_feeder,
)

logger = logging.getLogger("sulis_executor")

#: An answer to a parked runner: ``(worker, runner, batch or None)``.
Answer = tuple[str, str, "Handout | None"]

_STOP = object()
#: Wakes the collector, which then sends what there is room for.
_WAKE = object()


def _in_event_loop() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _Pushed:
    """A result a worker pushed (see ``_remote.send_back``), for the collector."""

    __slots__ = ("key", "payload", "failed")

    def __init__(self, key: str, payload: bytes, failed: bool = False) -> None:
        self.key = key
        self.payload = payload
        # The payload is the error running the batch raised, as a pickled
        # outcome (see _remote.run_pulled).
        self.failed = failed


class _Settle:
    """A note to the collector: fail these batches with this error (kept off
    the scheduler's event loop, where done callbacks must not run)."""

    __slots__ = ("batches", "error")

    def __init__(self, batches: list[Batch], error: BaseException) -> None:
        self.batches = batches
        self.error = error


class _Fetched:
    """A note to the collector: the results of these finished tasks, fetched
    (a payload per task), or the error fetching them raised."""

    __slots__ = ("pairs", "outcome")

    def __init__(self, pairs: list[tuple[Any, Batch]], outcome: Any) -> None:
        self.pairs = pairs
        self.outcome = outcome


class _Withdraw:
    """A note to the collector: withdraw these map chunks from the cluster."""

    __slots__ = ("futures",)

    def __init__(self, futures: list[Future[Any]]) -> None:
        self.futures = futures


#: Scheduler task states in which no worker has been given the task.
_UNSTARTED = ("released", "waiting", "queued", "no-worker")


def unstarted_tasks(keys: list[str], dask_scheduler: Any = None) -> tuple[list[str], list[str]]:
    """Run on the scheduler (``Client.run_on_scheduler``): of these tasks,
    those it holds that no worker has been given yet, and those it has not
    heard of yet (their graph is still on its way)."""
    tasks = dask_scheduler.tasks
    held = [key for key in keys if key in tasks and tasks[key].state in _UNSTARTED]
    unheard = [key for key in keys if key not in tasks]
    return held, unheard

#: Batches of submitted calls aim to take about this long on a worker, which
#: amortises Dask's per-task cost while keeping batches short enough that
#: work stays spread over the workers.
TARGET_BATCH_SECONDS = 0.02
MAX_BATCH_CALLS = 4096

#: How long withdrawing abandoned map chunks waits for the scheduler to have
#: heard of the newest ones.
WITHDRAW_TIMEOUT = 2.0

#: How often an idle collector checks that the scheduler is still there.
SCHEDULER_CHECK_INTERVAL = 0.5

#: How long a runner with nothing to do waits for more work before its task
#: ends (see Engine.hand_out); a new runner costs a scheduler round trip.
RUNNER_LINGER = 0.05



class Call:
    """One future the user (or ``map``) waits on.

    For ``submit`` the body is ``(fn, args, kwargs)``; for a ``map`` chunk it
    is ``(fn, [args, ...])`` and the future's result is the list of outcomes.
    ``notified`` records that ``set_running_or_notify_cancel`` was called,
    which must happen exactly once per future.
    """

    __slots__ = ("future", "kind", "body", "notified", "batch", "first_index", "timing")

    def __init__(self, kind: str, body: Any, first_index: int = 0,
                 timing: CallTiming | None = None) -> None:
        self.future: Future[Any] = Future()
        self.kind = kind
        self.body = body
        self.notified = False
        self.batch: Batch | None = None
        self.first_index = first_index
        # Set for the chunks of a map with an explicit chunksize: those
        # measured short travel together (see _take_batch_locked).
        self.timing = timing


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
    """One cluster task: several submitted calls, or map chunks (one, or
    several of an explicit ``chunksize``)."""

    __slots__ = ("batch_id", "kind", "calls", "dask_future", "name", "shared_keys", "pickled",
                 "deaths", "fetching")

    def __init__(self, batch_id: str, kind: str, calls: list[Call], name: str) -> None:
        self.batch_id = batch_id
        self.kind = kind
        self.calls = calls
        self.dask_future: Any = None
        self.name = name
        self.shared_keys: tuple[str, ...] = ()
        # Batches for runners (see Engine.hand_out): their pickled calls, and
        # how many workers died running them.
        self.pickled: Pickled | None = None
        self.deaths = 0
        # Its task finished, and its result is being fetched (Engine._fetch).
        self.fetching = False


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


def submit_queued(client: Any, func: Any, tasks: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
    """Submit ``func(*args)`` for each ``(key, args)``, as tasks the scheduler
    holds in its queue until a worker thread is free, as
    ``ProcessPoolExecutor``'s workers take calls; first in, first out.

    Dask queues only "root-ish" tasks: groups larger than twice the cluster's
    threads, which our few batches in flight never are. Without queuing, a
    task goes to a worker at once, possibly behind a long call while another
    worker idles, until work stealing moves it a second or more later.
    Marking the tasks data producers makes the scheduler queue them.

    The tasks go in one graph, as ``Client.submit`` sends one task: with its
    order given (Dask would otherwise order a graph's tasks its own way, in
    a helper thread), each graph newer than the last (``fifo_timeout=0``),
    and no hashing of the payloads to name the graph. One graph update
    instead of one per task took 8 tasks to their workers in 9-11 ms instead
    of 13-18 ms.
    """
    try:
        from dask._expr import LLGExpr
        from dask._task_spec import Task
        from distributed.spans import SpanMetadata
    except ImportError:
        return [_submit_queued_one(client, func, key, args) for key, args in tasks]
    graph = {key: Task(key, func, *args, _data_producer=True) for key, args in tasks}
    futures = client._graph_to_futures(
        LLGExpr(graph, _determ_token=uuid.uuid4().hex),
        list(graph),
        internal_priority={key: order for order, key in enumerate(graph)},
        fifo_timeout=0,
        span_metadata=SpanMetadata(collections=[{"type": "Future"}]),
    )
    return [futures[key] for key in graph]


def _submit_queued_one(client: Any, func: Any, key: str, args: tuple[Any, ...]) -> Any:
    """One task per graph, for a Dask without the expression graphs above."""
    try:
        from dask._task_spec import Task
    except ImportError:  # an older dask still: no queuing, only a little less balance
        return client.submit(func, *args, key=key, pure=False)
    (future,) = client.get({key: Task(key, func, *args, _data_producer=True)}, [key], sync=False)
    return future


class Engine:
    """Queues calls, sends them to a Dask cluster in batches, settles futures."""

    def __init__(self, client: Any, launcher: Any, token: str, has_initializer: bool,
                 direct_to_workers: bool = False, shared_directory: str | None = None,
                 results_pushed: bool = False, one_call_per_task: bool = False,
                 scheduler: Any = None) -> None:
        self.client = client
        self.launcher = launcher
        self.token = token
        self.has_initializer = has_initializer
        self.broken: str | None = None
        self._address = getattr(getattr(client, "scheduler", None), "address", "(unknown)")
        self._broken_tb = ""
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._queue: collections.deque[Call] = collections.deque()
        self._in_flight: dict[str, Batch] = {}
        self._done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._counter = itertools.count()
        self._closed = False
        self._close_lock = threading.Lock()
        # Measured seconds per submitted call on a worker (exponential average).
        self._call_timing = CallTiming()
        # max_tasks_per_child counts submitted calls, so each is its own task.
        self._one_call_per_task = one_call_per_task
        self._capacity = 2
        self._capacity_checked = 0.0
        # Scatter straight to the workers when this process can reach them
        # (when the executor started them), not through the scheduler.
        self._shared = SharedBuffers(client, direct_to_workers, shared_directory)
        self._refresh_capacity()
        # Dask's client batches its messages to the scheduler every 10 ms,
        # which is most of a task's round trip here (11 ms -> 6 ms measured):
        # executor calls are latency-bound, so send after 1 ms instead.
        stream = getattr(client, "scheduler_comm", None)
        if stream is not None and getattr(stream, "interval", 0) > 0.001:
            stream.interval = 0.001
        # Results pushed by the workers, when the scheduler forwards them.
        handlers = getattr(client, "_stream_handlers", None)
        self._push = False
        if results_pushed and isinstance(handlers, dict):
            handlers[_remote.RESULT_OP] = self._on_pushed
            self._push = True
        # Batches handed to runners on request, when the scheduler runs in
        # this process (see _remote.run_pulled): those ready to go, what each
        # runner (by task key) is running and on which worker, and the
        # runners' tasks.
        self._ready: collections.deque[Batch] = collections.deque()
        self._running: dict[str, tuple[str, str]] = {}
        self._runners: dict[str, Any] = {}
        # Runners waiting for work (see hand_out), and on which worker; and
        # how many runners are to end, each freeing a thread for a task.
        self._parked: dict[str, str] = {}
        self._runners_to_end = 0
        # Results being fetched (see _fetch), to cancel when closing.
        self._fetches: set[Any] = set()
        self._scheduler: Any = scheduler if self._push and not one_call_per_task else None
        if self._scheduler is not None:
            import dask.config

            self._allowed_failures = int(dask.config.get("distributed.scheduler.allowed-failures", 3))
            register_feeder(token, self)
        self._collector = threading.Thread(
            target=self._collect_loop, name=f"sulis-executor-results-{token[:8]}", daemon=True
        )
        # Not made to leave signals to the main thread (see _signals): the
        # futures' done callbacks run here, and a process one of them starts
        # would begin with Ctrl-C and SIGTERM blocked.
        self._collector.start()

    # -- accepting work ----------------------------------------------------

    def submit_call(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[Any]:
        call = Call(_remote.CALLS, (fn, args, kwargs))
        self._enqueue([call])
        return call.future

    def submit_chunks(self, fn: Any, chunks: list[tuple[list[Any], int]], star: bool,
                      timing: CallTiming | None = None) -> list[Future[Any]]:
        """Run ``fn`` over each ``(chunk, index of its first item)``
        (``fn(*item)`` if ``star``), each chunk as one task, or, given the
        map's ``timing``, several short ones as one task; they are sent
        together. Each result is ``((values, error), seconds)``: see
        ``_remote.run_batch``."""
        calls = [Call(_remote.CHUNK, (fn, chunk, star), first, timing) for chunk, first in chunks]
        self._enqueue(calls)
        return [call.future for call in calls]

    def _enqueue(self, calls: list[Call]) -> None:
        """Queue calls and send what the cluster has room for."""
        for call in calls:
            def on_done(_: Future[Any], call: Call = call) -> None:
                self._on_call_done(call)

            call.future.add_done_callback(on_done)
        with self._lock:
            self._queue.extend(calls)
        self._pump()

    def _on_call_done(self, call: Call) -> None:
        # A call cancelled while queued: tell the waiters (wait, as_completed)
        # now, since the sender will skip it and never do so.
        if call.future.cancelled():
            with self._lock:
                self._notify_locked(call)

    def _notify_locked(self, call: Call) -> bool:
        """Move a pending future to RUNNING (True), or tell the waiters of a
        cancelled one (False): exactly once per future, under ``_lock``."""
        if call.notified:
            return call.future.running()
        call.notified = True
        return call.future.set_running_or_notify_cancel()

    # -- sending -----------------------------------------------------------

    def _refresh_capacity(self) -> None:
        now = time.monotonic()
        if now - self._capacity_checked < 0.5:
            return
        self._capacity_checked = now
        if self._scheduler_lost():
            return  # scheduler_info would block until the client gives up
        try:
            info = self.client.scheduler_info(n_workers=0)
            threads = int(info.get("total_threads") or 0)
        except Exception:
            return
        self._capacity = max(2, 2 * threads)

    @property
    def threads(self) -> int:
        """Worker threads in the cluster, as last seen (refreshed twice a second)."""
        self._refresh_capacity()
        return max(1, self._capacity // 2)

    def _batch_size(self, queued: int, per_call: float | None) -> int:
        """How many submitted calls (or chunks of one map) go in the next
        batch, each measured to take ``per_call`` seconds."""
        if per_call is None or self._one_call_per_task:
            return 1  # nothing measured yet: calls may be long, so spread them
        by_time = int(TARGET_BATCH_SECONDS / max(per_call, 1e-7))
        # Leave some of the queue for the other workers.
        fair_share = -(-queued // max(1, self._capacity // 2))
        return max(1, min(by_time, fair_share, MAX_BATCH_CALLS))

    def _take_batch_locked(self) -> list[Call]:
        """Pop the next batch's calls, skipping cancelled ones, and mark them
        running: from here on they belong to the cluster, as in
        ``ProcessPoolExecutor`` once a call is handed to a worker."""
        calls: list[Call] = []
        limit = None
        while self._queue:
            call = self._queue[0]
            if calls and not (call.kind == calls[0].kind and call.timing is calls[0].timing):
                break
            self._queue.popleft()
            if not self._notify_locked(call):
                continue  # cancelled while queued
            calls.append(call)
            if call.kind == _remote.CHUNK and call.timing is None:
                break  # sized to keep a worker busy on its own (see _map)
            if limit is None:
                limit = self._batch_size(len(self._queue) + 1, (call.timing or self._call_timing).seconds)
            if len(calls) >= limit:
                break
        return calls

    def _pump(self) -> None:
        """Send batches while the cluster has room for them."""
        if not self._send_lock.acquire(blocking=False):
            # Another thread is sending; it loops until there is no room or
            # no work, so what we queued will be picked up.
            return
        try:
            while True:
                self._refresh_capacity()
                with self._lock:
                    if self.broken is not None or self._closed:
                        return
                    room = self._capacity - len(self._in_flight)
                    if room <= 0 or not self._queue:
                        return
                    # What there is room for goes as one graph (see submit_queued).
                    batches: list[list[Call]] = []
                    while self._queue and len(batches) < room:
                        calls = self._take_batch_locked()
                        if calls:
                            batches.append(calls)
                if batches:
                    self._send(batches)
        finally:
            try:
                self._start_runners()
            finally:
                self._send_lock.release()
        # Work may have been queued (or batches put back for runners) while we
        # held the send lock and returned.
        with self._lock:
            more = (bool(self._queue) and len(self._in_flight) < self._capacity
                    or self._runners_wanted_locked() > 0)
        if more and not self._closed:
            self._pump()

    def _send(self, groups: list[list[Call]]) -> None:
        """Send each group of calls as one batch (one task), all in one graph."""
        prepared = []
        try:
            for calls in groups:
                ready = self._prepare(calls)
                if ready is not None:
                    prepared.append(ready)
        except BaseException:
            # Ctrl-C or SystemExit in the caller's thread while pickling (see
            # _prepare): none of these calls reaches the cluster.
            for batch, _ in prepared:
                self._shared.done(batch.shared_keys)
            for calls in groups:
                for call in calls:
                    self._set(call, CancelledError(), error=True)
            raise
        if not prepared:
            return
        # Batches for runners; the rest go as tasks.
        pulled = []
        as_tasks = []
        for batch, pickled in prepared:
            if self._pullable(pickled):
                batch.pickled = pickled
                pulled.append(batch)
            else:
                as_tasks.append((batch, pickled))
        with self._lock:
            for batch, _ in prepared:
                self._in_flight[batch.batch_id] = batch
            handed = self._make_ready_locked(pulled)
            if as_tasks:
                # Tasks need worker threads, which runners would hold as long
                # as they find work: as many runners as there are tasks end.
                handed += self._end_parked_locked()
                self._runners_to_end = min(self._runners_to_end + len(as_tasks), len(self._runners))
        self._send_handouts(handed)
        prepared = as_tasks
        if not prepared:
            return
        tasks = []
        for batch, pickled in prepared:
            reply_to = (self.client.id, batch.batch_id) if self._push else None
            tasks.append((batch.batch_id, (batch.kind, pickled.payload, self.token, self.has_initializer,
                                           reply_to, *pickled.handles)))
        try:
            dask_futures = submit_queued(self.client, _remote.run_batch, tasks)
        except BaseException as error:
            with self._lock:
                for batch, _ in prepared:
                    self._in_flight.pop(batch.batch_id, None)
            for batch, _ in prepared:
                self._shared.done(batch.shared_keys)
                if not isinstance(error, Exception):
                    # KeyboardInterrupt/SystemExit in the submitting thread:
                    # these calls never reached the cluster; fail them, so
                    # shutdown does not wait for them for ever.
                    self._settle(batch, CancelledError())
                else:
                    self._settle(batch, BrokenSulisExecutor(f"could not submit work to the cluster: {error}"))
            if not isinstance(error, Exception):
                raise
            return
        for (batch, _), dask_future in zip(prepared, dask_futures):
            batch.dask_future = dask_future
            dask_future.add_done_callback(self._done.put)

    # -- runners: batches on request -------------------------------------

    def _pullable(self, pickled: Pickled) -> bool:
        """Whether a runner may take this batch: any batch, when the
        scheduler runs in this process, but one holding Dask data (a buffer
        scattered through Dask), which only a task's dependencies can
        deliver, so it goes as a task."""
        return self._scheduler is not None and not pickled.needs_dask

    def _make_ready_locked(self, batches: list[Batch]) -> list[Answer]:
        """Queue batches for the runners; hand what it can to those parked
        waiting for work. Returns ``(worker, runner, handout)`` to send."""
        self._ready.extend(batches)
        return self._hand_parked_locked()

    def _hand_parked_locked(self) -> list[Answer]:
        handed: list[Answer] = []
        while self._parked and self._ready:
            runner, worker = self._parked.popitem()
            handout = self._take_ready_locked(worker, runner)
            if handout is None:  # only withdrawn batches were left
                self._parked[runner] = worker
                break
            handed.append((worker, runner, handout))
        return handed

    def _take_ready_locked(self, worker: str, runner: str) -> Handout | None:
        """Give ``runner`` the next ready batch still in flight (others were
        withdrawn, or settled), if any."""
        while self._ready:
            batch = self._ready.popleft()
            if batch.batch_id in self._in_flight:
                self._running[runner] = (worker, batch.batch_id)
                assert batch.pickled is not None
                return batch.batch_id, batch.kind, batch.pickled.payload, batch.pickled.handles
        return None

    def _send_handouts(self, handed: list[Answer]) -> None:
        """Send runners their batches (or ``None``), on the scheduler's loop."""
        if not handed:
            return
        scheduler, token = self._scheduler, self.token

        def send() -> None:
            for worker, runner, handout in handed:
                send_handout(scheduler, worker, token, runner, handout)

        try:
            scheduler.loop.add_callback(send)
        except RuntimeError:  # the scheduler's loop is closed: no runner is left
            pass

    def _start_runners(self) -> None:
        """Start runner tasks for the ready batches, up to one per thread."""
        if self._scheduler is None:
            return
        with self._lock:
            if self.broken is not None or self._closed:
                return
            keys = [f"sulis-runner-{uuid.uuid4().hex[:12]}" for _ in range(self._runners_wanted_locked())]
            for key in keys:
                self._runners[key] = None
        if not keys:
            return
        try:
            futures = submit_queued(self.client, _remote.run_pulled,
                                    [(key, (self.token, self.token, self.has_initializer)) for key in keys])
        except BaseException as error:
            with self._lock:
                for key in keys:
                    self._runners.pop(key, None)
            if not isinstance(error, Exception):
                raise  # Ctrl-C in the caller's thread: the next _pump starts them
            self.mark_broken(f"could not start work on the cluster: {error}")
            return
        with self._lock:
            for key, future in zip(keys, futures):
                if key in self._runners:  # else it has ended already
                    self._runners[key] = future
        for future in futures:
            future.add_done_callback(self._done.put)

    def _runners_wanted_locked(self) -> int:
        """How many more runners the ready batches need, one per thread at most."""
        if self._scheduler is None or not self._ready or self.broken is not None or self._closed:
            return 0
        threads = max(1, self._capacity // 2)
        return max(0, min(threads, len(self._ready) + len(self._running)) - len(self._runners))

    def hand_out(self, worker: str, runner: str, key: str | None, payload: bytes | None,
                 failed: bool = False, more: bool = True) -> Handout | None:
        """A runner's request for its next batch (unless not ``more``), with
        the result of its last (``key``), or the error running it raised
        (``failed``): called on the scheduler's event loop, in this process.

        With no batch ready, the runner waits (``PARKED``) for up to
        ``RUNNER_LINGER`` seconds, so that work coming soon after (the next
        chunks of a map, or the next map) needs no new runner task."""
        if key is not None:
            self._done.put(_Pushed(key, payload or b"", failed))
        with self._lock:
            self._running.pop(runner, None)
            if self._runners_to_end > 0 and more:
                self._runners_to_end -= 1
                more = False
            if more and self.broken is None and not self._closed:
                handout = self._take_ready_locked(worker, runner)
                if handout is not None:
                    return handout
            if more and self.broken is None and not self._closed and runner in self._runners:
                self._parked[runner] = worker
                self._scheduler.loop.call_later(RUNNER_LINGER, self._end_parked, runner)
                return PARKED  # type: ignore[no-any-return]
            # The runner ends: count it out now, so that work coming in the
            # meantime starts runners of its own instead of waiting for this
            # one's task to be reported done.
            self._runners.pop(runner, None)
        return None

    def _end_parked(self, runner: str) -> None:
        """A parked runner found no work in time: end it (on the scheduler's loop)."""
        with self._lock:
            worker = self._parked.pop(runner, None)
            if worker is None:
                return  # it was given work
            self._runners.pop(runner, None)
        self._send_handouts([(worker, runner, None)])

    def _end_parked_locked(self, on_worker: str | None = None) -> list[Answer]:
        """End the parked runners (those on ``on_worker`` only, if given):
        the answers to send them."""
        ended: list[Answer] = []
        for runner, worker in list(self._parked.items()):
            if on_worker is None or worker == on_worker:
                del self._parked[runner]
                self._runners.pop(runner, None)
                ended.append((worker, runner, None))
        return ended

    def handout_returned(self, key: str) -> None:
        """A batch reached a runner that had gone (on the scheduler's loop):
        it goes to another."""
        with self._lock:
            for runner, (_, batch_id) in list(self._running.items()):
                if batch_id == key:
                    del self._running[runner]
            batch = self._in_flight.get(key)
            if batch is not None:
                self._ready.appendleft(batch)
            handed = self._hand_parked_locked()
        self._send_handouts(handed)
        self._done.put(_WAKE)  # the collector starts a runner for it, if need be

    def worker_lost(self, worker: str) -> None:
        """A worker left the cluster (on the scheduler's event loop): the
        batches its runners were running go to other runners, as Dask runs a
        task again elsewhere, unless workers died running them more often
        than Dask allows a task (``distributed.scheduler.allowed-failures``)."""
        died = []
        with self._lock:
            self._end_parked_locked(worker)  # nothing to tell them: their worker is gone
            for runner, (where, batch_id) in list(self._running.items()):
                if where != worker:
                    continue
                del self._running[runner]
                batch = self._in_flight.get(batch_id)
                if batch is None:
                    continue
                batch.deaths += 1
                if batch.deaths > self._allowed_failures:
                    del self._in_flight[batch_id]
                    died.append(batch)
                else:
                    self._ready.appendleft(batch)
            handed = self._hand_parked_locked()
        self._send_handouts(handed)
        for batch in died:
            self._done.put(_Settle([batch], self._died_error(batch)))
        self._done.put(_WAKE)  # the collector starts runners for what was put back

    def _runner_ended(self, dask_future: Any) -> None:
        """A runner's task ended. One that ends holding a batch failed (Dask
        gave up on it, or a bug): so does the batch, rather than go round
        again."""
        with self._lock:
            self._runners.pop(dask_future.key, None)
            self._parked.pop(dask_future.key, None)
            held = self._running.pop(dask_future.key, None)
            batch = self._in_flight.pop(held[1], None) if held else None
        if batch is not None:
            error: BaseException = BrokenSulisExecutor(f"the task running {batch.name} ended unexpectedly")
            if dask_future.status == "error":
                error = self._failure_of(dask_future, batch)
            self._settle(batch, error)
            self._shared.done(batch.shared_keys)
        dask_future.release()

    def _died_error(self, batch: Batch, cause: BaseException | None = None) -> WorkerDiedError:
        died = WorkerDiedError(
            f"task {batch.batch_id} (calling {batch.name}) failed because the worker "
            f"process running it died, on every one of Dask's attempts (see "
            f"distributed.scheduler.allowed-failures). A call that crashes its "
            f"process (os._exit, a segfault, running out of memory) does this."
        )
        died.__cause__ = cause
        return died

    def _prepare(self, calls: list[Call]) -> tuple[Batch, Pickled] | None:
        """A batch of these calls and its pickled payload; ``None`` if none
        of them could be pickled (those calls are failed)."""
        kind = calls[0].kind
        name = function_name(calls[0].body[0])
        batch = Batch(f"{name}-{next(self._counter)}-{uuid.uuid4().hex[:12]}", kind, calls, name)
        try:
            pickled = self._shared.dumps([c.body for c in calls], inline_whole=self._scheduler is not None)
        except BaseException as failure:
            if not self._fails_the_call(failure):
                raise
            # Find the culprit call by call, fail it, and send the rest.
            good = []
            for call in calls:
                try:
                    cloudpickle.dumps(call.body)
                    good.append(call)
                except BaseException as error:
                    if not self._fails_the_call(error):
                        raise
                    self._set(call, pickling_error(call, error), error=True)
            if len(good) == len(calls):
                # Every call pickles alone: sharing a buffer with the cluster
                # failed, not pickling. Fail the batch rather than retry.
                for call in calls:
                    self._set(call, BrokenSulisExecutor(f"could not send work to the cluster: {failure}"), error=True)
                return None
            return self._prepare(good) if good else None
        batch.shared_keys = pickled.keys
        for call in calls:
            call.batch = batch
        return batch, pickled

    def _fails_the_call(self, error: BaseException) -> bool:
        """Whether an error raised while pickling calls, or unpickling their
        results, fails those calls.

        Any ``Exception`` does. A ``KeyboardInterrupt`` or ``SystemExit``
        does too when the collector thread is pickling (the calls that
        waited for room) or unpickling: there it can only come from an
        object's ``__reduce__`` (signals reach the main thread), and the
        collector must not die, or every future would hang. In the caller's
        thread it is the user's Ctrl-C, and it propagates.
        """
        return isinstance(error, Exception) or threading.current_thread() is self._collector

    # -- results -----------------------------------------------------------

    def _collect_loop(self) -> None:
        while True:
            try:
                items = [self._done.get(timeout=SCHEDULER_CHECK_INTERVAL)]
            except queue.Empty:
                self._check_scheduler()
                self._shared.release_idle()
                continue
            while True:
                try:
                    items.append(self._done.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in items)
            withdraw = [item.futures for item in items if isinstance(item, _Withdraw)]
            pushed = [item for item in items if isinstance(item, _Pushed)]
            settle = [item for item in items if isinstance(item, _Settle)]
            fetched = [item for item in items if isinstance(item, _Fetched)]
            try:
                # Pushed results first: each arrives before its task's end.
                for item in pushed:
                    self._deliver_pushed(item)
                for note in settle:
                    for batch in note.batches:
                        self._settle(batch, note.error)
                        self._shared.done(batch.shared_keys)
                for results in fetched:
                    self._deliver_fetched(results)
                self._collect([item for item in items
                               if item is not _STOP and item is not _WAKE
                               and not isinstance(item, (_Withdraw, _Pushed, _Settle, _Fetched))])
                if withdraw:
                    self._withdraw(withdraw)
                # Also under steady load, when the queue is never empty for long.
                self._shared.release_idle()
            except BaseException:  # never let the collector die: futures would hang
                # (Not the main thread: no Ctrl-C is swallowed here.)
                logger.exception("sulis_executor: error while collecting results")
            if stop:
                return
            self._pump()

    def _on_pushed(self, key: str, payload: bytes, **_: Any) -> None:
        """A worker pushed a result (called on the client's event loop)."""
        self._done.put(_Pushed(key, payload))

    def _deliver_pushed(self, pushed: _Pushed) -> None:
        with self._lock:
            batch = self._in_flight.pop(pushed.key, None)
        if batch is None:
            return  # settled already: withdrawn, or the executor is broken
        # The task is done with: release it now, so that Dask neither keeps
        # the result nor, should the worker die, runs the calls again.
        if batch.dask_future is not None:
            batch.dask_future.release()
        if pushed.failed:
            try:
                _, error, tb = cloudpickle.loads(pushed.payload)
                error = rebuild_exception(error, tb)
            except BaseException as unreadable:
                if not self._fails_the_call(unreadable):
                    raise
                error = UnpicklingFailedError(f"a worker failed running {batch.name}, with an "
                                              f"error that cannot be unpickled here: {unreadable}")
                error.__cause__ = unreadable
            self._settle(batch, error)
        else:
            self._deliver(batch, pushed.payload)
        self._shared.done(batch.shared_keys)

    def _scheduler_lost(self) -> bool:
        # Dask's client moves to "connecting" the moment its connection to the
        # scheduler drops, and tries to reconnect for its whole timeout; work
        # in flight is gone by then, so we do not wait for that verdict.
        return not self._closed and self.client.status not in ("running", "newly-created")

    def _check_scheduler(self) -> None:
        if self.broken is None and self._scheduler_lost():
            self.mark_broken(f"lost the connection to the Dask scheduler at {self._address}")
        # A launcher that can tell its workers are gone for good (the srun
        # step ended: scancel, or every worker killed) breaks us at once.
        gone = getattr(self.launcher, "workers_gone", None)
        if self.broken is None and gone is not None and gone():
            self.mark_broken("the srun step running the workers has ended; no worker will come back")

    def _collect(self, dask_futures: list[Any]) -> None:
        """Tasks (or runner tasks) that Dask reports done: settle the
        failed ones, fetch the results of the finished ones."""
        if any(f.status == "cancelled" for f in dask_futures):
            # Only the client cancels our tasks, when the scheduler is gone.
            self._check_scheduler()
        with self._lock:
            runners = [f for f in dask_futures if f.key in self._runners]
        if runners:
            for dask_future in runners:
                self._runner_ended(dask_future)
            ended = {id(f) for f in runners}
            dask_futures = [f for f in dask_futures if id(f) not in ended]
        finished: list[tuple[Any, Batch]] = []
        failed: list[tuple[Any, Batch]] = []
        with self._lock:
            for dask_future in dask_futures:
                batch = self._in_flight.get(dask_future.key)
                if batch is None:  # cancelled, pushed, or settled already
                    dask_future.release()
                elif batch.dask_future is not dask_future or batch.fetching:
                    continue  # told twice, or its result is on its way here
                elif dask_future.status in ("lost", "pending"):
                    # Lost with its worker: Dask runs it again, and says when.
                    dask_future.add_done_callback(self._done.put)
                elif dask_future.status == "finished":
                    batch.fetching = True
                    finished.append((dask_future, batch))
                else:
                    del self._in_flight[dask_future.key]
                    failed.append((dask_future, batch))
        for dask_future, batch in failed:
            self._settle(batch, self._failure_of(dask_future, batch))
            dask_future.release()
            self._shared.done(batch.shared_keys)
        if finished:
            self._fetch(finished)

    def _fetch(self, pairs: list[tuple[Any, Batch]]) -> None:
        """Fetch finished tasks' results, without blocking the collector,
        and for as long as it takes: a large result may take many seconds
        to arrive, and one lost on the way (its worker died) is computed
        again by Dask, which ``Client.gather`` waits for. The batches stay
        in flight meanwhile, so a broken or closing executor settles them;
        the results come back to the collector (``_Fetched``)."""
        import asyncio

        try:
            gathering = self.client.gather([f for f, _ in pairs], asynchronous=True)
            fetch = asyncio.run_coroutine_threadsafe(gathering, self.client.loop.asyncio_loop)
        except Exception as error:  # the client's loop is gone: so is the scheduler
            self._done.put(_Fetched(pairs, error))
            return
        with self._lock:
            self._fetches.add(fetch)

        def fetched(attempt: Any) -> None:
            with self._lock:
                self._fetches.discard(attempt)
            if attempt.cancelled():
                return  # the executor is closing, and settles what is left
            error = attempt.exception()
            self._done.put(_Fetched(pairs, error if error is not None else attempt.result()))

        fetch.add_done_callback(fetched)

    def _deliver_fetched(self, fetched: _Fetched) -> None:
        """Settle the batches whose results were fetched (or failed to be)."""
        with self._lock:
            pairs = [(f, self._in_flight.pop(batch.batch_id, None)) for f, batch in fetched.pairs]
        for (dask_future, batch), payload in zip(pairs, self._fetched_payloads(fetched)):
            if batch is not None:  # else settled meanwhile: withdrawn, broken, closed
                self._deliver(batch, payload)
                self._shared.done(batch.shared_keys)
            dask_future.release()

    def _fetched_payloads(self, fetched: _Fetched) -> list[Any]:
        """Each batch's payload, or the error that stands for it."""
        if not isinstance(fetched.outcome, BaseException):
            return list(fetched.outcome)
        # The gather failed as a whole: a task failed after all (run again
        # after its worker died, and failed), or the scheduler is gone.
        self._check_scheduler()
        return [self._failure_of(f, batch) if f.status != "finished" else BrokenSulisExecutor(
                    f"could not fetch the result of {batch.name} from the cluster: "
                    f"{type(fetched.outcome).__name__}: {fetched.outcome}")
                for f, batch in fetched.pairs]

    def _failure_of(self, dask_future: Any, batch: Batch) -> BaseException:
        from distributed.scheduler import KilledWorker

        if dask_future.status == "error":
            try:
                error = dask_future.exception(timeout=5)
            except Exception as inner:
                error = inner
            if isinstance(error, KilledWorker):
                return self._died_error(batch, error)
            return error if isinstance(error, BaseException) else BrokenSulisExecutor(str(error))
        if dask_future.status == "cancelled" and self._closed:
            return CancelledError()
        return BrokenSulisExecutor(
            f"task {batch.batch_id} was lost: the connection to the Dask scheduler is gone "
            f"(task status {dask_future.status!r})"
        )

    def _deliver(self, batch: Batch, payload: Any) -> None:
        """Settle a batch's futures with its result (see
        ``_remote._dumps_entries``), or the error fetching it raised."""
        if isinstance(payload, BaseException):
            self._settle(batch, payload)
            return
        try:
            outcomes, seconds = self._read_outcomes(payload)
        except BaseException as error:  # not a payload of ours: a bug
            if not self._fails_the_call(error):
                raise
            outcomes, seconds = [(UNREADABLE_HERE, error, "")], 0.0
        if outcomes[0][0] == _remote.BROKEN:
            _, message, tb = outcomes[0]
            self.mark_broken(message, tb)
            self._settle(batch, self.broken_error())
            return
        if len(outcomes) != len(batch.calls):
            # The batch as a whole could not be read: all its calls fail so.
            outcomes = outcomes[:1] * len(batch.calls)
        elif batch.kind == _remote.CALLS:
            self._call_timing.observe(seconds / len(outcomes))
        elif batch.calls[0].timing is not None:
            batch.calls[0].timing.observe(seconds / len(outcomes))
        for call, outcome in zip(batch.calls, outcomes):
            tag = outcome[0]
            if tag == _remote.OK:
                self._set(call, outcome[1])
            elif tag == _remote.ERROR:
                self._set(call, rebuild_exception(outcome[1], outcome[2]), error=True)
            else:
                self._set(call, unpickling_failed(call, outcome, batch.name), error=True)

    def _read_outcomes(self, payload: Any) -> tuple[list[Any], float]:
        """A batch's outcomes (see ``_remote._dumps_entries``), one per call
        or map chunk, and its ``seconds``. One that cannot be unpickled is
        ``(UNREADABLE_HERE, the error, "")``, whatever the error (even
        ``SystemExit``, from a ``__reduce__``, in the collector thread)."""
        view, ends, seconds = _remote.read_entries(payload)
        outcomes = []
        start = 0
        for end in ends:
            try:
                outcomes.append(pickle.loads(view[start:end]))
            except BaseException as error:
                if not self._fails_the_call(error):
                    raise
                outcomes.append((UNREADABLE_HERE, error, ""))
            start = end
        return outcomes, seconds

    def _set(self, call: Call, value: Any, error: bool = False) -> None:
        with self._lock:
            if not self._notify_locked(call):
                return  # cancelled
        try:
            if error:
                call.future.set_exception(value)
            else:
                call.future.set_result(value)
        except InvalidStateError:  # settled already, e.g. by a broken executor
            pass
        # Break the call <-> batch cycle and drop the arguments now, so the
        # result and the inputs go as soon as the caller lets go of them.
        call.batch = None
        call.body = None

    def _settle(self, batch: Batch, error: BaseException) -> None:
        for call in batch.calls:
            self._set(call, error, error=True)

    # -- breaking and closing -------------------------------------

    def broken_error(self) -> BrokenSulisExecutor:
        error = BrokenSulisExecutor(f"{self.broken}; the executor is not usable any more")
        if self._broken_tb:
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
            batches = list(self._in_flight.values())
            self._in_flight.clear()
            self._ready.clear()
            self._running.clear()
            ended = self._end_parked_locked()
            queued = list(self._queue)
            self._queue.clear()
        self._send_handouts(ended)
        error = self.broken_error()
        for batch in batches:
            self._settle(batch, error)
            self._shared.done(batch.shared_keys)
        for call in queued:
            self._set(call, error, error=True)
        self._cancel_on_cluster(batches, "the work of a broken executor")

    def _cancel_on_cluster(self, batches: list[Batch], what: str) -> None:
        """Cancel the batches' Dask tasks, if the scheduler is there to hear it."""
        dask_futures = [b.dask_future for b in batches if b.dask_future is not None]
        if dask_futures and not self._scheduler_lost():
            try:
                self.client.cancel(dask_futures)
            except Exception:
                logger.debug("could not cancel %s", what, exc_info=True)

    def abandon_chunks(self, futures: list[Future[Any]]) -> None:
        """Nobody will read these map chunks (the results iterator was closed,
        dropped, timed out or failed): cancel those still queued here, and
        withdraw from the cluster those handed to it that no worker has
        started, so they never run. One a worker is running finishes there,
        as a running call does in ``ProcessPoolExecutor`` (and
        ``shutdown(wait=True)`` waits for it); its result is dropped.
        """
        # Not under _lock: cancelling runs done callbacks, which take it.
        handed = [future for future in futures if not future.cancel()]
        if not handed:
            return
        if _in_event_loop():
            # A dropped iterator is collected in whatever thread, even Dask's
            # event loop, where the client's blocking calls cannot be made:
            # the collector asks the scheduler instead, a moment later.
            self._done.put(_Withdraw(handed))
        else:
            # Before returning, so that once close() returns nothing
            # abandoned starts, however soon workers free up.
            self._withdraw([handed])

    def _withdraw(self, groups: list[list[Future[Any]]]) -> None:
        futures = {id(future) for group in groups for future in group}
        with self._lock:
            keys = [batch_id for batch_id, batch in self._in_flight.items()
                    if batch.kind == _remote.CHUNK
                    and all(id(call.future) in futures for call in batch.calls)]
            # Batches for runners: those not handed out yet are withdrawn
            # here; those a runner has are running.
            running = {batch_id for _, batch_id in self._running.values()}
            ready = [self._in_flight.pop(key) for key in keys
                     if self._in_flight[key].pickled is not None and key not in running]
            keys = [key for key in keys if key in self._in_flight and self._in_flight[key].pickled is None]
        for batch in ready:
            self._settle(batch, CancelledError())
            self._shared.done(batch.shared_keys)
        if not keys or self._scheduler_lost():
            if ready:
                self._pump()
            return
        # A task whose graph is still on its way cannot be cancelled yet (nor
        # released: the scheduler takes a graph in asynchronously), so ask
        # again until the scheduler has heard of every one, briefly.
        held: list[str] = []
        deadline = time.monotonic() + WITHDRAW_TIMEOUT
        try:
            while True:
                known, unheard = self.client.run_on_scheduler(unstarted_tasks, keys)
                held += known
                keys = unheard
                if not keys or time.monotonic() > deadline:
                    break
                time.sleep(0.005)
        except Exception:  # e.g. a scheduler that cannot import us: let them run
            logger.debug("could not ask the scheduler which chunks have started", exc_info=True)
        with self._lock:
            withdrawn = [self._in_flight.pop(key) for key in held if key in self._in_flight]
        for batch in withdrawn:
            self._settle(batch, CancelledError())
            self._shared.done(batch.shared_keys)
        # Cancelled on the scheduler by the time cancel() returns.
        self._cancel_on_cluster(withdrawn, "abandoned map chunks")
        self._pump()  # their places on the cluster are free

    def unfinished_futures(self) -> list[Future[Any]]:
        with self._lock:
            queued = [c.future for c in self._queue]
            sent = [c.future for b in self._in_flight.values() for c in b.calls]
        return queued + sent

    def cancel_queued(self) -> None:
        with self._lock:
            queued = [c.future for c in self._queue]
        for future in queued:
            future.cancel()

    def wait_idle(self) -> None:
        """Block until every future the engine knows of is settled."""
        from concurrent.futures import wait

        while futures := [f for f in self.unfinished_futures() if not f.done()]:
            wait(futures)

    def close(self, timeout: float = 10.0) -> None:
        """Release the cluster; idempotent, each step bounded by ``timeout``."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + timeout
        self._done.put(_STOP)
        if self._collector is not threading.current_thread():
            self._collector.join(timeout)
        with self._lock:
            batches = list(self._in_flight.values())
            self._in_flight.clear()
            self._ready.clear()
            self._running.clear()
            ended = self._end_parked_locked()
            queued = list(self._queue)
            self._queue.clear()
            fetches = list(self._fetches)
        for fetch in fetches:
            fetch.cancel()
        if self._scheduler is not None:
            self._send_handouts(ended)
            unregister_feeder(self.token)
        for call in queued:
            call.future.cancel()
        for batch in batches:
            self._settle(batch, BrokenSulisExecutor("the executor was shut down before this call finished"))
        try:
            self._shared.release()
            self.client.close(timeout=max(1.0, deadline - time.monotonic()))
        except Exception:
            logger.debug("error closing the Dask client", exc_info=True)
        try:
            self.launcher.close(timeout=max(1.0, deadline - time.monotonic()))
        except Exception:
            logger.debug("error closing the cluster", exc_info=True)
