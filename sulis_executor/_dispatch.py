"""Handing batches to the nodes' agents, on the executor's side.

When the executor starts its cluster (local, ``srun`` and MPI modes), each
node runs an agent, a Dask worker feeding the node's pool of member
processes (see ``_agent`` and ``_pool``), and the scheduler runs in the
executor's process. A batch then waits in :class:`AgentDispatch` until an
agent has a free member, and goes to it on the agent's stream: no Dask task,
no scheduler round trip between one batch and the next, a message per batch
and node, however many CPUs the node has.

:class:`AgentDispatch` owns these batches from the moment they are offered
until their result comes back (or they are withdrawn, or fail): those
waiting (``ready``, oldest first) and those each node holds. It knows each
node's members: a batch goes to a node with a free member, where it starts
at once, or, if it is short, to a node with room in its pool's queue (see
:data:`HELD_PER_MEMBER`), where it waits for the first member to finish.
A batch a node loses (its member died, or the whole node) waits again at
the front, and fails as a dead worker's task does once workers died running
it more often than Dask allows a task
(``distributed.scheduler.allowed-failures``).

It is pure bookkeeping behind one lock: it sends nothing itself, but
returns the handouts to send, per node, and what was settled.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from ._calls import Batch

#: A batch as an agent takes it: key, kind, payload, shared buffers, and
#: whether the executor has an initializer (see ``_agent.Agent._take``).
Handout = tuple[str, str, Any, tuple[Any, ...], bool]
#: Batches to send, per node (the agent's worker address).
Handouts = dict[str, list[Handout]]

#: Batches a node may hold per member of its pool: one running, and one
#: waiting in the pool for the first member to finish, if it is short (see
#: :data:`SHORT_BATCH_SECONDS`). Without the waiting one, each member idled
#: for a round trip (member, pool, agent, this process and back) between
#: batches, which grows with the members finishing together and the agents
#: sharing CPUs: 128 members reached 0.62-0.83 of the ideal on 50 ms calls
#: (docs/scaling.rst). ``ProcessPoolExecutor`` also keeps calls queued
#: for its workers (``max_workers + 1``).
HELD_PER_MEMBER = 2
#: The longest a batch is expected to take (from measured calls) and still
#: wait in a node's pool. A waiting batch cannot go to another node that
#: frees up first: at the end of the work, a node may idle while another
#: still has batches queued, for up to a batch's length. That is worth the
#: round trip it saves only for short batches; longer ones, and calls not
#: measured yet (which may be long), go only to a free member, so that
#: every node takes them from the one queue here.
SHORT_BATCH_SECONDS = 1.0


def is_short(batch: Batch) -> bool:
    return batch.expected is not None and batch.expected <= SHORT_BATCH_SECONDS


class _Node:
    __slots__ = ("members", "held")

    def __init__(self) -> None:
        self.members = 0
        self.held: dict[str, Batch] = {}

    @property
    def free(self) -> int:
        """Members with nothing to run: a batch handed now starts at once."""
        return self.members - len(self.held)

    @property
    def room(self) -> int:
        """Batches it may take now, short ones waiting in its pool."""
        return HELD_PER_MEMBER * self.members - len(self.held)

    def takes(self, batch: Batch) -> bool:
        return (self.room if is_short(batch) else self.free) > 0


class AgentDispatch:
    """The batches for agents: waiting, and held by each node."""

    def __init__(self, allowed_failures: int, has_initializer: bool) -> None:
        self._lock = threading.Lock()
        self._ready: collections.deque[Batch] = collections.deque()
        self._nodes: dict[str, _Node] = {}
        # Running totals over the nodes: the engine asks for them on every
        # submit, and a sum would cost time in proportion to the nodes.
        self._held = 0
        self._members = 0
        self._allowed_failures = allowed_failures
        self._has_initializer = has_initializer

    # -- what the engine asks ------------------------------------------------

    def offer(self, batches: list[Batch]) -> Handouts:
        """Batches to run: queue them, and hand out what nodes have room for."""
        with self._lock:
            self._ready.extend(batches)
            return self._hand_out_locked()

    def count(self) -> int:
        """Batches owned here: waiting, and held by nodes."""
        with self._lock:
            return len(self._ready) + self._held

    def members(self) -> int:
        """Members of every node's pool: how many batches can run at once."""
        with self._lock:
            return self._members

    def batches(self) -> list[Batch]:
        with self._lock:
            return [*self._ready, *(b for node in self._nodes.values() for b in node.held.values())]

    def withdraw(self, keys: set[str]) -> tuple[list[Batch], Handouts]:
        """Take back the batches among ``keys`` that no node holds yet, and
        hand out those that waited behind them."""
        with self._lock:
            withdrawn = [batch for batch in self._ready if batch.batch_id in keys]
            self._ready = collections.deque(b for b in self._ready if b.batch_id not in keys)
            return withdrawn, self._hand_out_locked()

    def clear(self) -> list[Batch]:
        """Forget every batch (the executor is broken, or closing): them all."""
        with self._lock:
            batches = [*self._ready, *(b for node in self._nodes.values() for b in node.held.values())]
            self._ready.clear()
            for node in self._nodes.values():
                node.held.clear()
            self._held = 0
        return batches

    # -- what the nodes say (on the scheduler's event loop) --------------------

    def members_changed(self, worker: str, members: int) -> Handouts:
        """A node's pool has ``members`` members now (it started, or one joined or left)."""
        with self._lock:
            node = self._nodes.setdefault(worker, _Node())
            self._members += members - node.members
            node.members = members
            return self._hand_out_locked()

    def done(self, worker: str, key: str) -> tuple[Batch | None, Handouts]:
        """A node finished a batch: the batch (``None`` if it was not the
        node's any more: the executor closed, or broke), and what to hand out."""
        with self._lock:
            node = self._nodes.get(worker)
            batch = node.held.pop(key, None) if node is not None else None
            self._held -= batch is not None
            return batch, self._hand_out_locked()

    def lost(self, worker: str, key: str) -> tuple[list[Batch], Handouts]:
        """A node's member died running a batch: the batches that fail for
        it (workers died running it too often), and what to hand out."""
        with self._lock:
            node = self._nodes.get(worker)
            batch = node.held.pop(key, None) if node is not None else None
            self._held -= batch is not None
            failed = self._requeue_locked([batch] if batch is not None else [])
            return failed, self._hand_out_locked()

    def node_lost(self, worker: str) -> tuple[list[Batch], Handouts]:
        """A node left the cluster: what it held runs elsewhere, or fails.
        A death counts only against the batches its members were running,
        not those still waiting in its pool."""
        with self._lock:
            node = self._nodes.pop(worker, None)
            if node is None:
                return [], self._hand_out_locked()
            self._held -= len(node.held)
            self._members -= node.members
            # Its members were running the oldest it held, one each, as far
            # as can be told (the pool runs batches in the order handed);
            # the rest waited in its pool.
            held = list(node.held.values())
            running, waiting = held[:node.members], held[node.members:]
            self._ready.extendleft(reversed(waiting))
            failed = self._requeue_locked(running)
            return failed, self._hand_out_locked()

    # -- under the lock ----------------------------------------------------------

    def _requeue_locked(self, batches: list[Batch]) -> list[Batch]:
        """Count a death against each; those over the limit fail, the rest
        wait again, first."""
        failed = []
        for batch in reversed(batches):
            batch.deaths += 1
            if batch.deaths > self._allowed_failures:
                failed.append(batch)
            else:
                self._ready.appendleft(batch)
        return failed

    def _hand_out_locked(self) -> Handouts:
        """Give waiting batches, oldest first, to nodes that take them (see
        ``_Node.takes``), round the nodes from the freest, so that work
        spreads over them. The oldest batch waits, and those behind it with
        it, until some node takes it."""
        handouts: Handouts = {}
        if not self._ready:
            return handouts
        nodes = [(worker, node) for worker, node in self._nodes.items() if node.room > 0]
        while self._ready and nodes:
            nodes.sort(key=lambda entry: (entry[1].free, entry[1].room), reverse=True)
            handed_any, still = False, []
            for worker, node in nodes:
                if not self._ready:
                    break
                batch = self._ready[0]
                if node.takes(batch):
                    self._ready.popleft()
                    node.held[batch.batch_id] = batch
                    self._held += 1
                    handed_any = True
                    assert batch.pickled is not None
                    handouts.setdefault(worker, []).append(
                        (batch.batch_id, batch.kind, batch.pickled.payload, batch.pickled.handles,
                         self._has_initializer))
                if node.room > 0:
                    still.append((worker, node))
            if not handed_any:
                break
            nodes = still
        return handouts
