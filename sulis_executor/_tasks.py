"""Batches as Dask tasks: for clusters the executor did not start, and for
batches that hold Dask data (a large buffer scattered through Dask, which
only a task's dependencies deliver).

:class:`TaskTransport` owns these batches from submission until their
result is back (or they are withdrawn, or fail). Dask tells of a task's end
through the future's callbacks, which put the future on the engine's notes
queue; the engine's collector then asks :meth:`TaskTransport.collect`,
which fetches finished results without blocking (``_fetch``), and settles
nothing itself: it returns each batch with its payload, or with the error
that stands for it, and the collector settles them (see ``_settle``).

"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any

import dask

from . import _dask_private, _remote
from ._agent import POOL_EXECUTOR
from ._calls import Batch
from ._shared import Pickled
from .errors import BrokenSulisExecutor, WorkerDiedError

logger = logging.getLogger("sulis_executor")

#: How long withdrawing abandoned map chunks waits for the scheduler to have
#: heard of the newest ones.
WITHDRAW_TIMEOUT = 2.0

#: Scheduler task states in which no worker has been given the task.
_UNSTARTED = ("released", "waiting", "queued", "no-worker")

#: A batch, and what settles it: its payload, or an exception.
Settled = tuple[Batch, Any]


class Fetched:
    """A note to the collector: the results of these finished tasks, fetched
    (a payload per task), or the error fetching them raised."""

    __slots__ = ("pairs", "outcome")

    def __init__(self, pairs: list[tuple[Any, Batch]], outcome: Any) -> None:
        self.pairs = pairs
        self.outcome = outcome


def unstarted_tasks(keys: list[str], dask_scheduler: Any = None) -> tuple[list[str], list[str], dict[str, str]]:
    """Run on the scheduler (``Client.run_on_scheduler``): of these tasks,
    those it holds that no worker has been given yet, those it has not
    heard of yet (their graph is still on its way), and those a worker has
    been given, with the worker (it may not have started them: Dask hands a
    worker more tasks than it has threads, unless ``worker-saturation`` is 1)."""
    states = _dask_private.scheduler_task_states(dask_scheduler, keys)
    held = [key for key in keys if key in states and states[key][0] in _UNSTARTED]
    unheard = [key for key in keys if key not in states]
    given = {key: worker for key, (state, worker) in states.items() if state == "processing" and worker}
    return held, unheard, given


def executing_tasks(keys: list[str], dask_worker: Any = None) -> list[str]:
    """Run on a worker (``Client.run``): those of these tasks it is running."""
    running = _dask_private.worker_running_keys(dask_worker)
    return [key for key in keys if key in running]


def died_error(batch: Batch, cause: BaseException | None = None) -> WorkerDiedError:
    died = WorkerDiedError(
        f"task {batch.batch_id} (calling {batch.name}) failed because the worker "
        f"process running it died, on every one of Dask's attempts (see "
        f"distributed.scheduler.allowed-failures). A call that crashes its "
        f"process (os._exit, a segfault, running out of memory) does this."
    )
    died.__cause__ = cause
    return died


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
    return _dask_private.submit_data_producers(client, func, tasks)


class TaskTransport:
    """The batches that travel as Dask tasks (see the module's docstring).

    ``notes`` is the engine's collector queue; ``scheduler_lost`` and
    ``closing`` tell whether it is still worth asking the cluster anything.
    """

    def __init__(self, client: Any, token: str, has_initializer: bool,
                 notes: queue.SimpleQueue[Any], scheduler_lost: Callable[[], bool],
                 closing: Callable[[], bool], to_pools: bool = False) -> None:
        self.client = client
        # On a cluster of nodes with pools (see _agent), the tasks run in
        # the pools' members, as the batches the agents take do.
        self._annotations = {"executor": POOL_EXECUTOR} if to_pools else {}
        self._token = token
        self._has_initializer = has_initializer
        self._notes = notes
        self._scheduler_lost = scheduler_lost
        self._closing = closing
        self._lock = threading.Lock()
        self._in_flight: dict[str, Batch] = {}
        # Results being fetched (see _fetch), to cancel when closing.
        self._fetches: set[Any] = set()

    def count(self) -> int:
        return len(self._in_flight)

    def batches(self) -> list[Batch]:
        with self._lock:
            return list(self._in_flight.values())

    def clear(self) -> list[Batch]:
        """Forget every batch (broken, or closing), and stop fetching."""
        with self._lock:
            batches = list(self._in_flight.values())
            self._in_flight.clear()
            fetches = list(self._fetches)
        for fetch in fetches:
            fetch.cancel()
        return batches

    # -- sending ------------------------------------------------------------------

    def send(self, prepared: list[tuple[Batch, Pickled]]) -> list[Settled]:
        """Submit each batch as a task, all in one graph; what failed to go."""
        with self._lock:
            for batch, _ in prepared:
                self._in_flight[batch.batch_id] = batch
        tasks = [(batch.batch_id, (batch.kind, pickled.payload, self._token, self._has_initializer,
                                   *pickled.handles))
                 for batch, pickled in prepared]
        try:
            with dask.annotate(**self._annotations):
                dask_futures = submit_queued(self.client, _remote.run_batch, tasks)
        except BaseException as error:
            with self._lock:
                for batch, _ in prepared:
                    self._in_flight.pop(batch.batch_id, None)
            if not isinstance(error, Exception):
                # KeyboardInterrupt/SystemExit in the submitting thread: these
                # calls never reached the cluster; they are cancelled, so
                # shutdown does not wait for them for ever, and it propagates.
                for batch, _ in prepared:
                    batch.settle(CancelledError())
                raise
            failure = BrokenSulisExecutor(f"could not submit work to the cluster: {error}")
            return [(batch, failure) for batch, _ in prepared]
        for (batch, _), dask_future in zip(prepared, dask_futures):
            batch.dask_future = dask_future
            dask_future.add_done_callback(self._notes.put)
        return []

    # -- results --------------------------------------------------------------------

    def collect(self, dask_futures: list[Any]) -> list[Settled]:
        """Tasks Dask reports done: the failed ones, settled by their error;
        the finished ones' results are fetched (see ``fetched``)."""
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
                    dask_future.add_done_callback(self._notes.put)
                elif dask_future.status == "finished":
                    batch.fetching = True
                    finished.append((dask_future, batch))
                else:
                    del self._in_flight[dask_future.key]
                    failed.append((dask_future, batch))
        settled = []
        for dask_future, batch in failed:
            settled.append((batch, self._failure_of(dask_future, batch)))
            dask_future.release()
        if finished:
            self._fetch(finished)
        return settled

    def _fetch(self, pairs: list[tuple[Any, Batch]]) -> None:
        """Fetch finished tasks' results, without blocking the collector,
        and for as long as it takes: a large result may take many seconds
        to arrive, and one lost on the way (its worker died) is computed
        again by Dask, which ``Client.gather`` waits for. The batches stay
        in flight meanwhile, so a broken or closing executor settles them;
        the results come back to the collector (``Fetched``)."""
        try:
            gathering = self.client.gather([f for f, _ in pairs], asynchronous=True)
            fetch = asyncio.run_coroutine_threadsafe(gathering, self.client.loop.asyncio_loop)
        except Exception as error:  # the client's loop is gone: so is the scheduler
            self._notes.put(Fetched(pairs, error))
            return
        with self._lock:
            self._fetches.add(fetch)

        def fetched(attempt: Any) -> None:
            with self._lock:
                self._fetches.discard(attempt)
            if attempt.cancelled():
                return  # the executor is closing, and settles what is left
            error = attempt.exception()
            self._notes.put(Fetched(pairs, error if error is not None else attempt.result()))

        fetch.add_done_callback(fetched)

    def fetched(self, note: Fetched) -> list[Settled]:
        """The batches whose results were fetched (or failed to be), with them."""
        with self._lock:
            pairs = [(f, self._in_flight.pop(batch.batch_id, None)) for f, batch in note.pairs]
        payloads = self._fetched_payloads(note)
        settled = []
        for (dask_future, batch), payload in zip(pairs, payloads):
            if batch is not None:  # else settled meanwhile: withdrawn, broken, closed
                settled.append((batch, payload))
            dask_future.release()
        return settled

    def _fetched_payloads(self, note: Fetched) -> list[Any]:
        """Each batch's payload, or the error that stands for it."""
        if not isinstance(note.outcome, BaseException):
            return list(note.outcome)
        # The gather failed as a whole: a task failed after all (run again
        # after its worker died, and failed), or the scheduler is gone.
        return [self._failure_of(f, batch) if f.status != "finished" else BrokenSulisExecutor(
                    f"could not fetch the result of {batch.name} from the cluster: "
                    f"{type(note.outcome).__name__}: {note.outcome}")
                for f, batch in note.pairs]

    def _failure_of(self, dask_future: Any, batch: Batch) -> BaseException:
        from distributed.scheduler import KilledWorker

        if dask_future.status == "error":
            try:
                error = dask_future.exception(timeout=5)
            except Exception as inner:
                error = inner
            if isinstance(error, KilledWorker):
                return died_error(batch, error)
            return error if isinstance(error, BaseException) else BrokenSulisExecutor(str(error))
        if dask_future.status == "cancelled" and self._closing():
            return CancelledError()
        return BrokenSulisExecutor(
            f"task {batch.batch_id} was lost: the connection to the Dask scheduler is gone "
            f"(task status {dask_future.status!r})"
        )

    # -- withdrawing ----------------------------------------------------------------

    def withdraw(self, keys: set[str]) -> list[Batch]:
        """Withdraw from the cluster the tasks among ``keys`` that no worker
        has started, so they never run: them. Blocks while it asks the
        scheduler, briefly."""
        with self._lock:
            keys_here = [key for key in keys if key in self._in_flight]
        if not keys_here or self._scheduler_lost():
            return []
        # A task whose graph is still on its way cannot be cancelled yet (nor
        # released: the scheduler takes a graph in asynchronously), so ask
        # again until the scheduler has heard of every one, briefly.
        held: list[str] = []
        given: dict[str, str] = {}
        deadline = time.monotonic() + WITHDRAW_TIMEOUT
        try:
            while True:
                known, unheard, processing = self.client.run_on_scheduler(unstarted_tasks, keys_here)
                held += known
                given.update(processing)
                keys_here = unheard
                if not keys_here or time.monotonic() > deadline:
                    break
                time.sleep(0.005)
            if given:
                # Given to a worker that has not started them: withdrawn too.
                running = self.client.run(executing_tasks, list(given), workers=sorted(set(given.values())))
                started = {key for keys in running.values() for key in keys}
                held += [key for key in given if key not in started]
        except Exception:  # e.g. a scheduler that cannot import us: let them run
            logger.debug("could not ask the scheduler which chunks have started", exc_info=True)
        with self._lock:
            withdrawn = [self._in_flight.pop(key) for key in held if key in self._in_flight]
        # Cancelled on the scheduler by the time cancel() returns.
        self.cancel(withdrawn, "abandoned map chunks")
        return withdrawn

    def cancel(self, batches: list[Batch], what: str) -> None:
        """Cancel the batches' Dask tasks, if the scheduler is there to hear it."""
        dask_futures = [b.dask_future for b in batches if b.dask_future is not None]
        if dask_futures and not self._scheduler_lost():
            try:
                self.client.cancel(dask_futures)
            except Exception:
                logger.debug("could not cancel %s", what, exc_info=True)
