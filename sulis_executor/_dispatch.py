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
node's members, so it never hands a node more batches than it has members
to run them: a batch handed out starts at once, as a call handed to
``ProcessPoolExecutor``'s worker does. A batch a node loses (its member
died, or the whole node) waits again at the front, and fails as a dead
worker's task does once workers died running it more often than Dask
allows a task (``distributed.scheduler.allowed-failures``).

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


class _Node:
    __slots__ = ("members", "held")

    def __init__(self) -> None:
        self.members = 0
        self.held: dict[str, Batch] = {}

    @property
    def free(self) -> int:
        return self.members - len(self.held)


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

    def withdraw(self, keys: set[str]) -> list[Batch]:
        """Take back the batches among ``keys`` that no node holds yet."""
        with self._lock:
            withdrawn = [batch for batch in self._ready if batch.batch_id in keys]
            self._ready = collections.deque(b for b in self._ready if b.batch_id not in keys)
        return withdrawn

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
        """A node left the cluster: what it held runs elsewhere, or fails."""
        with self._lock:
            node = self._nodes.pop(worker, None)
            if node is not None:
                self._held -= len(node.held)
                self._members -= node.members
            failed = self._requeue_locked(list(node.held.values()) if node is not None else [])
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
        """Give waiting batches to nodes with free members, the freest first,
        so that work spreads over the nodes."""
        handouts: Handouts = {}
        if not self._ready:
            return handouts
        free = sorted(((node.free, worker) for worker, node in self._nodes.items() if node.free > 0),
                      reverse=True)
        while self._ready and free:
            still_free = []
            for room, worker in free:
                if not self._ready:
                    break
                batch = self._ready.popleft()
                self._nodes[worker].held[batch.batch_id] = batch
                self._held += 1
                assert batch.pickled is not None
                handouts.setdefault(worker, []).append(
                    (batch.batch_id, batch.kind, batch.pickled.payload, batch.pickled.handles,
                     self._has_initializer))
                if room > 1:
                    still_free.append((room - 1, worker))
            free = still_free
        return handouts
