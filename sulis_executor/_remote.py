"""What runs inside a worker process: one cluster task runs a batch of calls,
or, as a runner (``run_pulled``), batch after batch handed out on request.

A batch arrives as one payload (its calls pickled one by one, see
``_shared``) and leaves as one ``bytes`` payload of outcomes (see
``_dumps_entries``). Dask serialises a returned Python list element by
element, which measured 40x slower than returning one ``bytes`` object
(PERF_NOTES.md), and pickling here also lets us name an unpicklable result
instead of letting Dask fail on it.

Each call's outcome (each map chunk's, for map) is pickled on its own
within that payload, as each call is on the way in, so that one the client
cannot unpickle fails its own call only, and so does a call that cannot be
unpickled here: such errors fail the call with ``UnpicklingFailedError``
however they end (``SystemExit`` too), and never reach Dask.

User exceptions are caught and returned as outcomes, so Dask never sees a
failed task: that keeps workers from logging "Compute Failed" and leaves
Dask's retry logic for what it is good at, workers that die.
"""

from __future__ import annotations

import io
import pickle
import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle

from . import _shared

# Outcome tags. An outcome is (OK, value) or (ERROR, exception, traceback text).
OK = 0
ERROR = 1
# The whole batch was refused because this worker's initializer failed:
# (BROKEN, message, traceback text) is then the only outcome.
BROKEN = 2
# The call (or map chunk) could not be unpickled here: (UNREADABLE, the
# error unpickling raised, traceback text). As the only outcome of a batch of
# several, the batch's payload as a whole could not be read.
UNREADABLE = 3

#: The stream message that carries a batch's result from its worker, through
#: the scheduler, to the client that submitted it (see ``send_back``).
RESULT_OP = "sulis-executor-result"
#: Results up to this size are pushed that way; larger ones wait for the
#: client to fetch them, as Dask's results do.
PUSH_LIMIT = 1_000_000

#: The stream messages of runners (see ``run_pulled``): a runner's request for
#: its next batch, with its last batch's result, goes to the scheduler; the
#: batch, or ``None`` when there is none, comes back.
PULL_OP = "sulis-executor-pull"
HANDOUT_OP = "sulis-executor-handout"
#: How long a runner waits for an answer before ending (the scheduler, in the
#: executor's process, is gone).
PULL_TIMEOUT = 60.0

# Batch kinds: independent calls (each gets an outcome), or one function
# mapped over a chunk of argument tuples (stops at the first error, as the
# results iterator of ``map`` stops there too).
CALLS = "calls"
CHUNK = "chunk"


def initializer_plugin_name(token: str) -> str:
    return f"sulis-executor-initializer-{token}"


try:
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover - distributed is a dependency
    _WorkerPlugin = object  # type: ignore[misc,assignment]


class InitializerPlugin(_WorkerPlugin):  # type: ignore[misc,valid-type]
    """Carries ``initializer(*initargs)`` to every worker, new and restarted.

    The initializer itself runs lazily, in the thread that runs tasks, just
    before the first batch in each process: ``ProcessPoolExecutor`` runs it in
    the thread that runs tasks too, so thread-local state it sets is visible.
    """

    def __init__(self, initializer: Any, initargs: tuple[Any, ...]) -> None:
        self.initializer = initializer
        self.initargs = initargs
        self._lock = threading.Lock()
        self._outcome: tuple[int, str, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"initializer": self.initializer, "initargs": self.initargs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["initializer"], state["initargs"])  # type: ignore[misc]

    def ensure_initialized(self) -> tuple[int, str, str] | None:
        """Run the initializer once per process; return a BROKEN outcome if it failed."""
        with self._lock:
            if self._outcome is None:
                try:
                    self.initializer(*self.initargs)
                    self._outcome = (OK, "", "")
                except BaseException as error:
                    name = getattr(self.initializer, "__qualname__", repr(self.initializer))
                    self._outcome = (
                        BROKEN,
                        f"initializer {name}() raised {type(error).__name__}: {error}",
                        traceback.format_exc(),
                    )
            return None if self._outcome[0] == OK else self._outcome


def task_budget_plugin_name(token: str) -> str:
    return f"sulis-executor-max-tasks-{token}"


#: The task budget of this worker process, by executor token (see TaskBudget).
_budgets: dict[str, TaskBudget] = {}


class TaskBudget(_WorkerPlugin):  # type: ignore[misc,valid-type]
    """``max_tasks_per_child``: each worker process runs at most this many
    cluster tasks, then leaves, and its launcher starts a fresh one.

    A task counts as ``ProcessPoolExecutor`` counts one: a submitted call
    (the engine then sends one call per task) or a chunk of ``map``. A task
    the scheduler hands over while the worker leaves is given back
    (``Reschedule``), never run.

    The worker leaves only once the client has the results it computed:
    Dask would run the calls again for a result lost with its worker.
    """

    #: How long a leaving worker waits for the client to take its results.
    RETIRE_TIMEOUT = 30.0

    def __init__(self, token: str, max_tasks: int) -> None:
        self.token = token
        self.max_tasks = max_tasks
        self._lock = threading.Lock()
        self._left = max_tasks
        self._retiring = False
        self._computed: list[str] = []
        self._worker: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"token": self.token, "max_tasks": self.max_tasks}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["token"], state["max_tasks"])  # type: ignore[misc]

    def setup(self, worker: Any) -> None:
        self._worker = worker
        _budgets[self.token] = self

    def teardown(self, worker: Any) -> None:
        _budgets.pop(self.token, None)

    def take(self) -> bool:
        """Count the current task against the budget; ``False`` if none is left."""
        with self._lock:
            if self._left <= 0:
                return False
            self._left -= 1
            return True

    def task_done(self, key: Any) -> None:
        """Called after each task; once the budget is spent, the worker leaves."""
        with self._lock:
            self._computed.append(key)
            if self._left > 0 or self._retiring or self._worker is None:
                return
            self._retiring = True
        self._worker.loop.add_callback(self._retire)

    def _holds_results(self) -> bool:
        """Whether a task we ran is still finishing, or its result is still
        wanted (the client releases it once it has it)."""
        for key in self._computed:
            task = self._worker.state.tasks.get(key)
            if task is not None and task.state in ("executing", "long-running", "memory"):
                return True
        return False

    async def _retire(self) -> None:
        import asyncio

        from distributed.core import Status

        worker = self._worker
        if worker.status != Status.running:
            return  # closing already (the executor shuts down)
        # The scheduler stops giving us tasks; any already on the way are given back.
        worker.status = Status.closing_gracefully
        deadline = time.monotonic() + self.RETIRE_TIMEOUT
        while self._holds_results() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if worker.data:  # inputs scattered here, or results the client never took
            # Hand over what only we hold to another worker, if there is one.
            retire = worker.scheduler.retire_workers(
                workers=[worker.address], close_workers=False, remove=False,
                stimulus_id=f"max-tasks-per-child-{time.time()}",
            )
            try:
                await asyncio.wait_for(retire, max(1.0, deadline - time.monotonic()))
            except Exception:  # no worker to take it: leave anyway
                pass
        await worker.close(reason="max_tasks_per_child")


def _error_outcome(error: BaseException, tag: int = ERROR) -> tuple[int, BaseException, str]:
    return (tag, error, "".join(traceback.format_exception(error)))


def _type_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}".removeprefix("builtins.")


def _picklable(outcome: Any) -> Any:
    """The outcome itself if it pickles, else one saying why it did not."""
    try:
        cloudpickle.dumps(outcome)
        return outcome
    except BaseException as failure:  # a __reduce__ may raise anything
        return _replacement(outcome, failure)


def _replacement(outcome: Any, failure: BaseException) -> Any:
    """The outcome to send instead of one whose pickling raised ``failure``.

    As with ``ProcessPoolExecutor``, the call fails with the error pickling
    raised, keeping its type, with a note naming what could not be pickled.
    A ``KeyboardInterrupt`` or ``SystemExit`` would end the caller's script
    from ``result()``: the call fails with ``UnpicklableError`` naming it
    instead. An error that cannot be unpickled here travels as its text.
    """
    from .errors import UnpicklableError, add_note

    tag, obj = outcome[0], outcome[1]
    if tag == UNREADABLE:
        from .errors import RemoteTraceback

        return (UNREADABLE, RemoteTraceback(outcome[2]), "")
    if tag == OK:
        what = f"the result, of type {_type_name(obj)},"
        tb = "".join(traceback.format_exception(failure))
    else:
        what = f"the exception {_type_name(obj)}: {obj}"
        tb = outcome[2]
    note = f"{what} could not be pickled to send it back from the worker"
    if isinstance(failure, Exception):
        add_note(failure, note)
        replacement = (ERROR, failure, tb)
        try:
            cloudpickle.dumps(replacement)
            return replacement
        except BaseException:
            pass
    return (ERROR, UnpicklableError(f"{note}: {type(failure).__name__}: {failure}"), tb)


def _repaired_chunk(entry: Any, failure: BaseException) -> Any:
    """A map chunk's entry that could not be pickled, stopped at its first
    value that cannot be, as the results iterator stops at an error."""
    if entry[0] != OK:
        return _replacement(entry, failure)
    (values, error), seconds = entry[1]
    for position, value in enumerate(values):
        repaired = _picklable((OK, value))
        if repaired[0] == ERROR:
            return (OK, ((values[:position], repaired), seconds))
    return (OK, ((values, _picklable(error)), seconds))


def _dumps_entries(entries: list[Any], seconds: float,
                   repair: Callable[[Any, BaseException], Any] = _replacement) -> bytes:
    """A batch's result: its entries (an outcome per call, or per map
    chunk), each pickled on its own, then where each ends and ``seconds``
    (see ``read_entries``). An entry that cannot be pickled is replaced by
    ``repair(entry, error)``.

    Pickled on their own, an entry the client cannot unpickle fails only its
    call. Measured on 1,000 small outcomes, that costs 0.24 us per outcome
    here and 0.25 us to read one on the client, against 0.05 us each for the
    batch as one pickle: at 25 us per submitted call, about 2%. Plain pickle
    goes first: cloudpickle costs 2 us per small object (0.45 with a Pickler
    kept), and is needed only for what plain pickle refuses (functions and
    classes defined by value, in ``__main__``). One stream, with no pickle
    nested in another, copies a large result no more than one pickle does.
    """
    file = io.BytesIO()
    pickler = pickle.Pickler(file, protocol=5)
    ends: list[int] = []
    end = 0
    for entry in entries:
        try:
            pickler.dump(entry)
            refused = False
        except BaseException:  # on a worker thread, only a __reduce__ raises these
            refused = True
        if refused:  # tried again out of the handler, so errors do not chain to this one
            file.seek(end)
            file.truncate()
            _dump_slowly(entry, file, repair)
        pickler.clear_memo()
        end = file.tell()
        ends.append(end)
    index = pickle.dumps((ends, seconds), protocol=5)
    file.write(index)
    file.write(len(index).to_bytes(8, "little"))
    return file.getvalue()


def _dump_slowly(entry: Any, file: io.BytesIO, repair: Callable[[Any, BaseException], Any]) -> None:
    """Pickle what plain pickle refused with cloudpickle, or, if that fails
    too, what ``repair`` makes of it."""
    start = file.tell()
    try:
        cloudpickle.dump(entry, file, protocol=5)
        return
    except BaseException as failure:
        replacement = repair(entry, failure)
    file.seek(start)
    file.truncate()
    try:
        cloudpickle.dump(replacement, file, protocol=5)
    except BaseException as failure:  # e.g. values that pickle alone, not together
        from .errors import UnpicklableError

        file.seek(start)
        file.truncate()
        message = f"the results could not be pickled to send them back from the worker: {failure!r}"
        cloudpickle.dump(_error_outcome(UnpicklableError(message)), file, protocol=5)


def read_entries(payload: Any) -> tuple[memoryview, list[int], float]:
    """On the client: a batch's result (see ``_dumps_entries``) as a view of
    it, where each entry's pickle ends in it, and ``seconds``."""
    view = memoryview(payload)
    index_size = int.from_bytes(view[-8:], "little")
    ends, seconds = pickle.loads(view[-8 - index_size:-8])
    return view, ends, seconds


def send_back(reply_to: tuple[str, str] | None, result: bytes) -> bytes:
    """Push a small result to the client on the worker's stream to the
    scheduler, which forwards it on its stream to the client; return it too.

    Dask only tells the client that a result is ready, and the client then
    asks the scheduler to fetch it from the worker: two more round trips, and
    the first fetch from each worker opens a connection (a TLS handshake).
    Pushed, a result arrives with the messages already flowing. The returned
    copy is Dask's ordinary result, which the client fetches if the push
    never arrives.
    """
    if reply_to is None or len(result) > PUSH_LIMIT:
        return result
    from distributed import get_worker

    client, key = reply_to
    worker = get_worker()
    _send_on_stream(worker, {"op": RESULT_OP, "client": client, "key": key, "payload": result})
    return result


def run_batch(kind: str, payload: bytes, token: str, has_initializer: bool,
              reply_to: tuple[str, str] | None, *shared: Any) -> bytes:
    """Run one batch of calls on a worker; return their outcomes and
    ``seconds``, pickled (see ``_dumps_entries``).

    ``seconds`` is the time spent in the calls, which the client uses to size
    later batches. ``reply_to`` is ``(client id, task key)`` when the
    scheduler forwards pushed results (see ``send_back``). ``shared`` are
    the payload's large out-of-band buffers in order (see ``_shared``),
    fetched by Dask as the task's dependencies.
    """
    budget = _budgets.get(token)  # max_tasks_per_child
    if budget is not None and not budget.take():
        # Handed to us while we retire: another worker (or our replacement) runs it.
        from distributed import Reschedule

        raise Reschedule()
    try:
        return send_back(reply_to, _run_batch(kind, payload, token, has_initializer, shared))
    finally:
        if budget is not None:
            from distributed import get_worker

            budget.task_done(get_worker().get_current_task())


def _run_batch(kind: str, payload: bytes, token: str, has_initializer: bool,
               shared: tuple[Any, ...]) -> bytes:
    if has_initializer:
        from distributed import get_worker

        plugin = get_worker().plugins.get(initializer_plugin_name(token))
        if not isinstance(plugin, InitializerPlugin):
            broken = (BROKEN, "the executor's initializer never reached this worker", "")
            return _dumps_entries([broken], 0.0)
        failure = plugin.ensure_initialized()
        if failure is not None:
            return _dumps_entries([failure], 0.0)

    try:
        parts = _shared.loads(payload, shared)
    except BaseException as error:  # the payload itself (e.g. a shared file gone)
        return _dumps_entries([_error_outcome(error, UNREADABLE)], 0.0)
    started = time.perf_counter()
    if kind == CHUNK:
        chunks = [_error_outcome(part.error, UNREADABLE) if isinstance(part, _shared.Unreadable)
                  else _run_chunk(*part) for part in parts]
        return _dumps_entries(chunks, time.perf_counter() - started, _repaired_chunk)
    outcomes: list[Any] = []
    for part in parts:
        if isinstance(part, _shared.Unreadable):
            outcomes.append(_error_outcome(part.error, UNREADABLE))
            continue
        fn, args, kwargs = part
        try:
            outcomes.append((OK, fn(*args, **kwargs)))
        except BaseException as error:
            outcomes.append(_error_outcome(error))
    return _dumps_entries(outcomes, time.perf_counter() - started)


def _run_chunk(fn: Any, items: list[Any], star: bool) -> tuple[int, Any]:
    """Map ``fn`` over one chunk, stopping at the first error.

    Returns ``(OK, ((values, error), seconds))`` where ``error`` is ``None``
    or ``(ERROR, exception, traceback)`` for the item after the last value.
    Plain lists pickle several times faster than a list of per-item outcome
    tuples, and tiny-task throughput is all pickling.
    """
    started = time.perf_counter()
    values: list[Any] = []
    error = None
    try:
        if star:
            for args in items:
                values.append(fn(*args))
        else:
            for item in items:
                values.append(fn(item))
    except BaseException as exc:
        error = _error_outcome(exc)
    return (OK, ((values, error), time.perf_counter() - started))


#: The answers awaiting each runner in this worker process, by task key.
_mailboxes: dict[str, queue.SimpleQueue[Any]] = {}


def run_pulled(engine: str, token: str, has_initializer: bool) -> None:
    """A runner: run the batches the executor hands out, one after another,
    all within this one cluster task, until it is told there are none.

    Each batch as a task of its own costs a scheduler round trip between
    batches (4-13 ms here), during which the worker thread idles; asking for
    the next batch on the worker's stream costs about 2 ms. Each request
    carries the last batch's result, which the scheduler, in the executor's
    process, hands straight to the executor (its ``Engine.hand_out``).
    ``engine`` names the executor's engine there.
    """
    from distributed import get_worker
    from distributed.core import Status

    worker = get_worker()
    runner = str(worker.get_current_task())
    mailbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
    _mailboxes[runner] = mailbox
    worker.stream_handlers.setdefault(HANDOUT_OP, _receive_handout)
    key = result = None
    failed = False
    try:
        while True:
            # A closing or paused worker (a signal, its scheduler gone, short
            # of memory) takes no more.
            more = worker.status == Status.running
            _send_on_stream(worker, {"op": PULL_OP, "engine": engine, "runner": runner, "key": key,
                                     "payload": result, "failed": failed, "more": more})
            if not more:
                return
            handout = _wait_for_handout(worker, mailbox)
            if handout is None:
                return
            key, kind, payload, shared = handout
            try:
                result, failed = _run_batch(kind, payload, token, has_initializer, shared), False
            except BaseException as error:  # e.g. the calls cannot be unpickled here
                result, failed = cloudpickle.dumps(_picklable(_error_outcome(error))), True
    finally:
        del _mailboxes[runner]
        # A batch handed out as this runner gave up waiting goes back.
        while True:
            try:
                late = mailbox.get_nowait()
            except queue.Empty:
                break
            if late is not None:
                _return_handout(worker, engine, runner, late[0])


def _wait_for_handout(worker: Any, mailbox: queue.SimpleQueue[Any]) -> tuple[str, str, Any, tuple[Any, ...]] | None:
    """The answer to a runner's request; ``None`` if there is no batch for
    it, or its worker stops running first (when closing, its stream to the
    scheduler closes, and the worker waits for its threads to end)."""
    from distributed.core import Status

    deadline = time.monotonic() + PULL_TIMEOUT
    while time.monotonic() < deadline:
        try:
            handout: tuple[str, str, Any, tuple[Any, ...]] | None = mailbox.get(timeout=0.05)
            return handout
        except queue.Empty:
            if worker.status != Status.running:
                return None
    return None


def _receive_handout(runner: str, engine: str = "", key: str | None = None, kind: str = CHUNK,
                     payload: Any = None, shared: Any = (), **_: Any) -> None:
    """The scheduler's answer to a runner's request (on the worker's event
    loop): a batch, sent back if the runner has gone, or ``None``."""
    mailbox = _mailboxes.get(runner)
    if mailbox is not None:
        mailbox.put(None if key is None else (key, kind, payload, tuple(shared or ())))
    elif key is not None:
        from distributed import get_worker

        _return_handout(get_worker(), engine, runner, key)


def _return_handout(worker: Any, engine: str, runner: str, key: str) -> None:
    _send_on_stream(worker, {"op": PULL_OP, "engine": engine, "runner": runner, "key": None,
                             "payload": None, "failed": False, "more": False, "returned": key})


def _send_on_stream(worker: Any, message: dict[str, Any]) -> None:
    """Send on the worker's stream to the scheduler, from any thread."""

    def send() -> None:  # on the worker's event loop, which owns the stream
        try:
            worker.batched_stream.send(message)
        except Exception:  # the scheduler is gone: nobody to tell
            pass

    worker.loop.add_callback(send)
