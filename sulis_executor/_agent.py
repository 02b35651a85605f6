"""A node's agent: its one Dask worker, which feeds the node's pool.

The agent is an ordinary Dask worker (``sulis_executor.worker`` with
``--pool``), so the cluster still takes Dask work (collections, joblib,
``ex.client``), in the agent's threads as on any Dask worker: one per
member of the node's pool, the thread count the executor sizes batches by.
Those tasks then find their worker (``get_worker``, ``worker_client``), and
a call that waits for Dask work it submitted never waits for a member.

The executor's own batches never become Dask tasks (but those holding Dask
data, which go as tasks annotated with :data:`POOL_EXECUTOR`, and so run in
the members too, see ``_pool.PoolExecutor``): the executor's engine, in the scheduler's
process, hands them to agents with free members (or, short ones, room in
their pool's queue) on the agent's stream, and the agent passes them to the
pool. On the same stream it reports, as they
happen: its members (``members``), each batch's result (``done``), and
each batch lost with the member that ran it (``lost``). So the scheduler
handles a message per batch and per node, not per CPU, and the executor
knows, for every node, how many batches it may hand out now.
"""

from __future__ import annotations

import logging
from typing import Any

from . import _dask_private
from ._pool import Event, Pool

logger = logging.getLogger("sulis_executor")

#: Agent to scheduler: an event of the agent's pool (see ``Agent``).
AGENT_OP = "sulis-executor-agent"
#: Scheduler to agent: batches to run.
HANDOUT_OP = "sulis-executor-handout"
#: The agent's Dask executor for the executor's own tasks: the pool.
POOL_EXECUTOR = "sulis-pool"


class Agent:
    """Connects a Dask worker's stream to its node's pool."""

    def __init__(self, worker: Any, pool: Pool) -> None:
        self.worker = worker
        self.pool = pool

    def start(self) -> None:
        """Take handouts, and report the members that have joined so far
        (on the worker's event loop, once it runs)."""
        _dask_private.add_stream_handler(self.worker, HANDOUT_OP, self._take)
        self._send({"event": "members", "members": self.pool.size})

    def _take(self, batches: list[Any] = (), **_: Any) -> None:  # type: ignore[assignment]
        """Batches from the executor (on the worker's event loop)."""
        for key, kind, payload, shared, has_initializer in batches:
            try:
                self.pool.put_batch(key, kind, payload, shared, has_initializer)
            except RuntimeError:  # closing: the engine counts it lost with us
                return

    def on_pool_event(self, event: Event) -> None:
        """From the pool's thread: pass it on, on the worker's event loop."""
        kind = event[0]
        if kind == "done":
            message = {"event": "done", "key": event[1], "payload": event[2]}
        elif kind == "lost":
            message = {"event": "lost", "key": event[1]}
        else:  # a member joined or left
            message = {"event": "members", "members": event[1]}
        try:
            self.worker.loop.add_callback(self._send, message)
        except RuntimeError:  # the loop is closed: the worker is gone
            pass

    def _send(self, message: dict[str, Any]) -> None:
        try:
            _dask_private.send_to_scheduler(self.worker, {"op": AGENT_OP, **message})
        except Exception:  # the scheduler is gone: nobody to tell
            pass
