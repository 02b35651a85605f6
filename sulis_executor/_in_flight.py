"""The batches on the cluster: sent, and not yet settled.

Two transports carry batches, the nodes' agents (``_agent_transport``) and
Dask tasks (``_tasks``), and each keeps the batches it carries until their
result is back. :class:`InFlight` is the engine's one view of the two: it
sends each batch by the right one, says how many are on the cluster (the
engine sends more only while there is room), and, in the collector's
thread, turns what the transports report (the collector's notes) into the
futures' states (``_settle``), withdraws map chunks nobody will read, and
takes every batch back when the executor breaks or closes.

Kept apart from the engine so that one object owns a batch between sent and
settled, and the work flows one way: the engine's queue holds calls until
they are sent, this holds them until they are settled, and the engine hears
back only how long each batch that ran took (for the time limit) and
whether the cluster broke.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any

from . import _remote
from ._agent_transport import WAKE, AgentResult, AgentsFailed, AgentTransport
from ._calls import Batch, Call, CallTiming
from ._settle import deliver
from ._shared import Pickled, SharedBuffers
from ._tasks import Fetched, TaskTransport, died_error

#: Tells the collector to stop (a note, besides Dask futures, _tasks.Fetched
#: and the agent transport's notes).
STOP = object()


class Withdraw:
    """A note to the collector: withdraw these map chunks from the cluster."""

    __slots__ = ("futures",)

    def __init__(self, futures: list[Future[Any]]) -> None:
        self.futures = futures


class InFlight:
    """Owns the batches sent to the cluster until they are settled.

    ``ran(seconds)`` hears how long each batch that ran took on its worker;
    ``broken(message, traceback)`` breaks the executor (a worker's
    initializer failed) and gives the error its calls fail with;
    ``check_health()`` breaks it if the cluster is gone (asked when Dask
    cancels one of our tasks, which only the client does, when the
    scheduler is gone)."""

    def __init__(self, tasks: TaskTransport, agents: AgentTransport | None, shared: SharedBuffers,
                 call_timing: CallTiming, ran: Callable[[float], None],
                 broken: Callable[[str, str], BaseException], check_health: Callable[[], None]) -> None:
        self._tasks = tasks
        self._agents = agents
        self._shared = shared
        self._call_timing = call_timing
        self._ran = ran
        self._broken = broken
        self._check_health = check_health
        #: The user's calls settled with a result, for the time limit's message.
        self.finished_calls = 0

    # -- what is on the cluster -------------------------------------------------

    def count(self) -> int:
        return self._tasks.count() + (self._agents.count() if self._agents is not None else 0)

    def batches(self) -> list[Batch]:
        return [*self._tasks.batches(), *(self._agents.batches() if self._agents is not None else [])]

    def futures(self) -> list[Future[Any]]:
        return [call.future for batch in self.batches() for call in batch.calls]

    def running_calls(self) -> int:
        """How many of the user's calls the batches on the cluster stand for."""
        return sum(items(call) for batch in self.batches() for call in batch.calls)

    # -- sending ------------------------------------------------------------------

    def send(self, prepared: list[tuple[Batch, Pickled]]) -> None:
        """Send each pickled batch: to the agents, or, for a cluster someone
        else started and for batches that hold Dask data, as a Dask task."""
        to_agents, as_tasks = [], []
        for batch, pickled in prepared:
            if self._agents is not None and not pickled.needs_dask:
                batch.pickled = pickled
                to_agents.append(batch)
            else:
                as_tasks.append((batch, pickled))
        if to_agents:
            self._agents.send(to_agents)  # type: ignore[union-attr]
        if as_tasks:
            for batch, error in self._tasks.send(as_tasks):
                self._drop(batch, error)

    # -- results (the collector thread) --------------------------------------------

    def handle(self, notes: list[Any]) -> None:
        """Settle what the collector's ``notes`` report."""
        dask_futures = []
        withdraw = []
        for note in notes:
            if isinstance(note, AgentResult):
                self._settle(note.batch, note.payload)
            elif isinstance(note, AgentsFailed):
                for batch in note.batches:
                    self._drop(batch, died_error(batch))
            elif isinstance(note, Fetched):
                for batch, payload in self._tasks.fetched(note):
                    self._settle(batch, payload)
            elif isinstance(note, Withdraw):
                withdraw.append(note.futures)
            elif note is not STOP and note is not WAKE:
                dask_futures.append(note)
        if dask_futures:
            if any(f.status == "cancelled" for f in dask_futures):
                self._check_health()  # only the client cancels our tasks, when the scheduler is gone
            for batch, payload in self._tasks.collect(dask_futures):
                self._settle(batch, payload)
        if withdraw:
            self.withdraw(withdraw)

    def _settle(self, batch: Batch, payload: Any) -> None:
        calls = sum(items(call) for call in batch.calls)
        seconds = deliver(batch, payload, self._call_timing, self._broken)
        if seconds is not None:
            self.finished_calls += calls
            self._ran(seconds)
        self._shared.done(batch.shared_keys)

    def _drop(self, batch: Batch, error: BaseException) -> None:
        batch.settle(error)
        self._shared.done(batch.shared_keys)

    def withdraw(self, groups: list[list[Future[Any]]]) -> bool:
        """Withdraw the map chunks of these futures that no worker has
        started, so they never run; whether any was withdrawn (their places
        on the cluster are free)."""
        futures = {id(future) for group in groups for future in group}
        keys = {batch.batch_id for batch in self.batches() if batch.kind == _remote.CHUNK
                and all(id(call.future) in futures for call in batch.calls)}
        if not keys:
            return False
        withdrawn = self._agents.withdraw(keys) if self._agents is not None else []
        withdrawn += self._tasks.withdraw(keys - {batch.batch_id for batch in withdrawn})
        for batch in withdrawn:
            self._drop(batch, CancelledError())
        return bool(withdrawn)

    # -- breaking and closing ---------------------------------------------------------

    def fail_all(self, error: BaseException) -> list[Batch]:
        """Fail every batch on the cluster with ``error`` (the executor is
        broken); the Dask tasks among them, to cancel (``cancel_tasks``)."""
        batches = self._tasks.clear()
        agents = self._agents.clear() if self._agents is not None else []
        for batch in [*batches, *agents]:
            self._drop(batch, error)
        return batches

    def cancel_tasks(self, batches: list[Batch]) -> None:
        self._tasks.cancel(batches, "the work of a broken executor")

    def close(self) -> list[Batch]:
        """Hear nothing more from the transports; what was on the cluster."""
        return [*self._tasks.clear(), *(self._agents.close() if self._agents is not None else [])]


def items(call: Call) -> int:
    """How many of the user's calls ``call`` stands for (a map chunk: its items)."""
    if call.kind == _remote.CHUNK and call.body is not None:
        return len(call.body[1])
    return 1
