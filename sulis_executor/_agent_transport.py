"""The transport to the nodes' agents: batches handed out on the scheduler's
own streams, no Dask task (the peer of ``_tasks.TaskTransport``).

Used when the executor started its cluster, so the scheduler runs in this
process. :class:`~._dispatch.AgentDispatch` decides who gets what; this
class sends its handouts on the scheduler's event loop, hears what the
agents report (registered with the scheduler's plugin as its ``Feeder``),
and passes what is settled to the engine's collector as notes, so that
futures are never settled (nor their done callbacks run) on the event loop.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any

from ._calls import Batch
from ._dispatch import AgentDispatch, Handouts

#: A note that wakes the engine's collector, which then sends what there is
#: room for (a node's members changed).
WAKE = object()


class AgentResult:
    """A batch's result, from a node's agent."""

    __slots__ = ("batch", "payload")

    def __init__(self, batch: Batch, payload: bytes) -> None:
        self.batch = batch
        self.payload = payload


class AgentsFailed:
    """Batches whose worker died running them more often than allowed."""

    __slots__ = ("batches",)

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches


def in_event_loop() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class AgentTransport:
    """Owns the batches handed to agents, from ``send`` until settled."""

    def __init__(self, scheduler: Any, has_initializer: bool, notes: queue.SimpleQueue[Any],
                 members_changed: Callable[[], None]) -> None:
        from ._pool import allowed_failures
        from .launchers._scheduler import register_feeder

        self._scheduler = scheduler
        self._notes = notes
        self._members_changed = members_changed
        self._closed = False
        self._dispatch = AgentDispatch(allowed_failures(), has_initializer)
        register_feeder(scheduler, self)

    # -- the engine's side ---------------------------------------------------

    def send(self, batches: list[Batch]) -> None:
        self._send_handouts(self._dispatch.offer(batches))

    def count(self) -> int:
        return self._dispatch.count()

    def members(self) -> int:
        return self._dispatch.members()

    def batches(self) -> list[Batch]:
        return self._dispatch.batches()

    def withdraw(self, keys: set[str]) -> list[Batch]:
        withdrawn, handouts = self._dispatch.withdraw(keys)
        self._send_handouts(handouts)
        return withdrawn

    def clear(self) -> list[Batch]:
        return self._dispatch.clear()

    def close(self) -> list[Batch]:
        """Hear nothing more; return what was in flight."""
        from .launchers._scheduler import register_feeder

        self._closed = True
        register_feeder(self._scheduler, None)
        return self._dispatch.clear()

    # -- the scheduler's side (its event loop: see _scheduler.Feeder) --------

    def agent_event(self, worker: str, event: str, key: str | None = None,
                    payload: bytes | None = None, members: int = 0) -> None:
        """What a node's agent reports (see ``_agent``)."""
        if self._closed:
            return
        if event == "done":
            batch, handouts = self._dispatch.done(worker, key or "")
            self._send_handouts(handouts)
            if batch is not None:
                self._notes.put(AgentResult(batch, payload or b""))
        elif event == "lost":
            failed, handouts = self._dispatch.lost(worker, key or "")
            self._send_handouts(handouts)
            if failed:
                self._notes.put(AgentsFailed(failed))
        elif event == "members":
            self._send_handouts(self._dispatch.members_changed(worker, members))
            self._members_changed()
            self._notes.put(WAKE)  # more room: the collector sends what waits

    def worker_lost(self, worker: str) -> None:
        """A worker left the cluster: if it was a node's agent, what it held
        runs elsewhere, or fails, as a dead worker's task does."""
        failed, handouts = self._dispatch.node_lost(worker)
        self._send_handouts(handouts)
        self._members_changed()
        self._notes.put(AgentsFailed(failed) if failed else WAKE)

    def _send_handouts(self, handouts: Handouts) -> None:
        """Send agents their batches, on the scheduler's event loop."""
        if not handouts:
            return
        from .launchers._scheduler import send_handouts

        if in_event_loop():
            send_handouts(self._scheduler, handouts)
            return
        try:
            self._scheduler.loop.add_callback(send_handouts, self._scheduler, handouts)
        except RuntimeError:  # the loop is closed: nobody is left to run them
            pass
