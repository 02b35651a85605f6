"""The client-side machinery behind :class:`SulisDaskExecutor`.

An :class:`Engine` owns the Dask client and the launcher. Work flows one
way through it:

1. **Queued.** ``submit`` and ``map`` put calls in a :class:`~._batching.CallQueue`.
2. **Sent.** While the cluster has room (two batches per worker thread),
   the queue's calls leave in batches, pickled (``_packing``, ``_shared``),
   and ``_in_flight`` owns each batch until its result is back, sent by one
   of two transports: the nodes' agents (``_agent_transport``), when the
   executor started the cluster, whose scheduler then runs in this process;
   or Dask tasks (``_tasks``), for a cluster someone else started, and for
   batches that hold Dask data.
3. **Settled.** Results come back to the engine's collector thread, from
   the scheduler's event loop (an agent's result) or Dask's callbacks (a
   task's end, whose result is then fetched), through one queue
   (``_notes``); the collector has ``_in_flight`` turn them into the
   futures' states (see ``_settle``), then sends what there is room for.
   When idle, it checks the cluster is still there (``_health``).

Settling runs in the collector only: the futures' done callbacks, which are
the user's code, never run on an event loop. Every wait on the cluster has
a deadline or ends with it: a lost scheduler, or workers gone for good,
break the executor (``mark_broken``), which fails what was pending.

The engine is kept apart from the executor object on purpose: threads and
callbacks refer to the engine only, so an executor that is dropped can be
garbage collected (see ``_lifetime``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import CancelledError, Future
from typing import Any

from . import _dask_private, _remote
from ._agent_transport import WAKE, AgentTransport, in_event_loop
from ._batching import CallQueue
from ._calls import Call, CallTiming
from ._health import ClusterHealth
from ._in_flight import STOP, InFlight, Withdraw, items
from ._packing import Packer
from ._shared import SharedBuffers
from ._tasks import TaskTransport
from ._walltime import Walltime
from .errors import BrokenSulisExecutor, RemoteTraceback, WalltimeExceeded

logger = logging.getLogger("sulis_executor")

#: How often an idle collector checks that the scheduler is still there.
SCHEDULER_CHECK_INTERVAL = 0.5

def _saturation(client: Any) -> float:
    """The scheduler's ``worker-saturation``: how many tasks per thread it
    hands a worker (``inf``: all it has); 1.1 when it cannot say."""
    try:
        return float(client.run_on_scheduler(_scheduler_saturation))
    except Exception:
        return 1.1


def _scheduler_saturation(dask_scheduler: Any = None) -> float:
    return float(getattr(dask_scheduler, "WORKER_SATURATION", 1.1))


class Engine:
    """Queues calls, sends them to a Dask cluster in batches, settles futures."""

    def __init__(self, client: Any, launcher: Any, token: str, has_initializer: bool,
                 direct_to_workers: bool = False, shared_directory: str | None = None,
                 one_call_per_task: bool = False,
                 scheduler: Any = None, walltime: Walltime | None = None) -> None:
        self.client = client
        # The job's time limit and SIGUSR1: when reached, queued calls fail
        # with WalltimeExceeded instead of starting (see _walltime).
        self._walltime = walltime
        self._unstarted_calls = 0
        self.launcher = launcher
        self.token = token
        self.has_initializer = has_initializer
        self.broken: str | None = None
        self._broken_tb = ""
        self._closed = False
        self._close_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._notes: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Measured seconds per submitted call on a worker (exponential average).
        self._call_timing = CallTiming()
        self._queue = CallQueue(self._call_timing, one_call_per_task)
        self._threads = 1
        self._threads_checked = 0.0
        # Batches on the cluster per worker thread: one running, one ready.
        # But a scheduler that hands a worker more tasks than it has threads
        # (Dask's default worker-saturation, 1.1, as a cluster someone else
        # started may have) would queue the ready one behind a long call on
        # that worker while another idles; then only one per thread.
        self._per_thread = 2 if scheduler is not None or _saturation(client) <= 1.0 else 1
        # Scatter straight to the workers when this process can reach them
        # (when the executor started them), not through the scheduler.
        self._shared = SharedBuffers(client, direct_to_workers, shared_directory)
        # Dask's client batches its messages to the scheduler every 10 ms,
        # which is most of a task's round trip here (11 ms -> 6 ms measured):
        # executor calls are latency-bound, so send after 1 ms instead.
        _dask_private.shorten_client_stream(client, 0.001)
        self._health = ClusterHealth(client, launcher, lambda: self._closed)
        self._tasks = TaskTransport(client, token, has_initializer, self._notes,
                                    self._health.scheduler_lost, lambda: self._closed,
                                    to_pools=scheduler is not None)
        # The nodes' agents, when the scheduler runs here (see _dispatch).
        self._agents: AgentTransport | None = None
        if scheduler is not None:
            self._agents = AgentTransport(scheduler, has_initializer, self._notes,
                                          self._members_changed)
        self._in_flight = InFlight(self._tasks, self._agents, self._shared, self._call_timing,
                                   self._ran, self._broken_by_initializer, self._check_health)
        self._packer = Packer(self._shared, self._call_timing, inline_whole=self._agents is not None,
                              collector=lambda: self._collector)
        self._refresh_threads()
        self._collector = threading.Thread(
            target=self._collect_loop, name=f"sulis-executor-results-{token[:8]}", daemon=True
        )
        # Not made to leave signals to the main thread (see _signals): the
        # futures' done callbacks run here, and a process one of them starts
        # would begin with Ctrl-C and SIGTERM blocked.
        self._collector.start()

    # -- accepting work --------------------------------------------------------

    def submit_call(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[Any]:
        call = Call(_remote.CALLS, (fn, args, kwargs))
        self._enqueue([call])
        return call.future

    def submit_chunks(self, fn: Any, chunks: list[tuple[list[Any], int]], star: bool,
                      timing: CallTiming | None = None,
                      per_item: float | None = None) -> list[Future[Any]]:
        """Run ``fn`` over each ``(chunk, index of its first item)``
        (``fn(*item)`` if ``star``), each chunk as one batch, or, given the
        map's ``timing``, several short ones as one batch. Each result is
        ``((values, error), seconds)``: see ``_remote._run_chunk``.
        ``per_item``: the map's measured seconds per item, if any."""
        calls = [Call(_remote.CHUNK, (fn, chunk, star), first, timing,
                      None if per_item is None else per_item * len(chunk)) for chunk, first in chunks]
        self._enqueue(calls)
        return [call.future for call in calls]

    def _enqueue(self, calls: list[Call]) -> None:
        for call in calls:
            # A call cancelled while queued: tell the waiters (wait,
            # as_completed) now, since the sender will skip it and never do so.
            call.future.add_done_callback(call.on_done)
        self._queue.put(calls)
        self._pump()

    # -- sending -----------------------------------------------------------------

    def _refresh_threads(self) -> None:
        now = time.monotonic()
        if now - self._threads_checked < 0.5:
            return
        self._threads_checked = now
        if self._agents is not None:
            self._threads = max(1, self._agents.members())
            return
        if self._health.scheduler_lost():
            return  # scheduler_info would block until the client gives up
        try:
            self._threads = max(1, _dask_private.total_threads(self.client))
        except Exception:
            return

    @property
    def threads(self) -> int:
        """Worker threads (or pool members) in the cluster, as last seen."""
        self._refresh_threads()
        return self._threads

    def worker_count(self) -> int:
        """Processes that run calls: the pools' members, or Dask's workers."""
        if self._agents is not None:
            return self._agents.members()
        return _dask_private.worker_count(self.client)

    def _members_changed(self) -> None:
        self._threads_checked = 0.0  # recount at the next look

    def _pump(self) -> None:
        """Send batches while the cluster has room: two per worker thread,
        one running and one ready."""
        if not self._send_lock.acquire(blocking=False):
            return  # the thread sending loops until no room or no work: it takes ours
        try:
            while self.broken is None and not self._closed:
                if self._walltime is not None and self._queue and self._walltime.stopped():
                    self._fail_unstarted(self._walltime.reason or "")
                    break
                room = self._per_thread * self.threads - self._in_flight.count()
                groups = self._queue.take(room, lambda: self.threads) if room > 0 else []
                if not groups:
                    break
                self._send(groups)
        finally:
            self._send_lock.release()
        # Work may have been queued while we held the send lock and returned.
        if (self._queue and self._in_flight.count() < self._per_thread * self._threads
                and self.broken is None and not self._closed):
            self._pump()

    def wake(self) -> None:
        """Have the collector look at the queue (from a signal handler too)."""
        self._notes.put(WAKE)

    def _fail_unstarted(self, reason: str) -> None:
        """Fail every queued call with WalltimeExceeded: none will start."""
        calls = [call for call in self._queue.drain() if not call.future.cancelled()]
        self._unstarted_calls += sum(items(call) for call in calls)
        message = (f"{reason}: this call was not started. {self._in_flight.finished_calls} calls "
                   f"finished in this executor, {self._in_flight.running_calls()} were running and "
                   f"{self._unstarted_calls} were not started; save the "
                   f"results you have and end the script (a resumed job can run the rest)")
        for call in calls:
            call.set(WalltimeExceeded(message), error=True)

    def _send(self, groups: list[list[Call]]) -> None:
        """Pickle each group of calls as one batch, and send it (see ``_in_flight``)."""
        prepared = []
        try:
            for calls in groups:
                ready = self._packer.pack(calls)
                if ready is not None:
                    prepared.append(ready)
        except BaseException:
            # Ctrl-C or SystemExit in the caller's thread while pickling (see
            # _packing): none of these calls reaches the cluster.
            for _, pickled in prepared:
                self._shared.done(pickled.keys)
            for calls in groups:
                for call in calls:
                    call.set(CancelledError(), error=True)
            raise
        self._in_flight.send(prepared)

    # -- results (the collector thread) --------------------------------------------

    def _collect_loop(self) -> None:
        while True:
            try:
                notes = [self._notes.get(timeout=SCHEDULER_CHECK_INTERVAL)]
            except queue.Empty:
                self._check_health()
                self._shared.release_idle()
                continue
            while True:
                try:
                    notes.append(self._notes.get_nowait())
                except queue.Empty:
                    break
            try:
                self._in_flight.handle(notes)
                # Also under steady load, when the queue is never empty for long.
                self._shared.release_idle()
            except BaseException:  # never let the collector die: futures would hang
                # (Not the main thread: no Ctrl-C is swallowed here.)
                logger.exception("sulis_executor: error while collecting results")
            stop = any(note is STOP for note in notes)
            # Notes refer to batches, and so to futures and their results:
            # let go of them while waiting for the next.
            del notes
            if stop:
                return
            self._pump()

    def _ran(self, seconds: float) -> None:
        """A batch took ``seconds`` on its worker: the next may take as long
        (the time limit allows for it)."""
        if self._walltime is not None:
            self._walltime.observe(seconds)

    def _broken_by_initializer(self, message: str, tb: str) -> BaseException:
        self.mark_broken(message, tb)
        return self.broken_error()

    # -- health, breaking and closing ---------------------------------------------

    def _check_health(self) -> None:
        if self.broken is None and (problem := self._health.problem()) is not None:
            self.mark_broken(problem)

    def broken_error(self) -> BrokenSulisExecutor:
        error = BrokenSulisExecutor(f"{self.broken}; the executor is not usable any more")
        if self._broken_tb:
            error.__cause__ = RemoteTraceback(self._broken_tb)
        return error

    def mark_broken(self, message: str, tb: str = "") -> None:
        """Fail every pending future and refuse new work, as a broken
        ``ProcessPoolExecutor`` does."""
        with self._close_lock:
            if self.broken is not None:
                return
            self.broken = message
            self._broken_tb = tb
        error = self.broken_error()
        tasks = self._in_flight.fail_all(error)
        for call in self._queue.drain():
            call.set(error, error=True)
        self._in_flight.cancel_tasks(tasks)

    def abandon_chunks(self, futures: list[Future[Any]]) -> None:
        """Nobody will read these map chunks (the results iterator was closed,
        dropped, timed out or failed): cancel those still queued here, and
        withdraw from the cluster those handed to it that no worker has
        started, so they never run. One a worker is running finishes there,
        as a running call does in ``ProcessPoolExecutor`` (and
        ``shutdown(wait=True)`` waits for it); its result is dropped.
        """
        handed = [future for future in futures if not future.cancel()]
        if not handed:
            return
        if in_event_loop():
            # A dropped iterator is collected in whatever thread, even Dask's
            # event loop, where the client's blocking calls cannot be made:
            # the collector withdraws them instead, a moment later.
            self._notes.put(Withdraw(handed))
        elif self._in_flight.withdraw([handed]):
            # (Before returning, so that once close() returns nothing
            # abandoned starts, however soon workers free up.)
            self._pump()  # their places on the cluster are free

    def unfinished_futures(self) -> list[Future[Any]]:
        return self._queue.futures() + self._in_flight.futures()

    def cancel_queued(self) -> None:
        for future in self._queue.futures():
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
        self._notes.put(STOP)
        if self._collector is not threading.current_thread():
            self._collector.join(timeout)
        batches = self._in_flight.close()
        for call in self._queue.drain():
            call.future.cancel()
        for batch in batches:
            batch.settle(BrokenSulisExecutor("the executor was shut down before this call finished"))
        try:
            self._shared.release()
            self.client.close(timeout=max(1.0, deadline - time.monotonic()))
        except Exception:
            logger.debug("error closing the Dask client", exc_info=True)
        try:
            self.launcher.close(timeout=max(1.0, deadline - time.monotonic()))
        except Exception:
            logger.debug("error closing the cluster", exc_info=True)

