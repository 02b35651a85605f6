"""The calls that wait on the client, and how they group into batches.

``ProcessPoolExecutor`` keeps a few calls per worker in flight and the rest
in its own queue; only queued calls can be cancelled, and a call counts as
running once it has been handed to a worker. We do the same: the engine
keeps at most two batches per worker thread on the cluster, and the rest
here. Calls that arrive faster than the cluster drains them leave together,
as one batch (a batch costs a message, or a Dask task; a call in a batch a
few microseconds), but only while measured calls are short, so long calls
still spread one per worker.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from . import _remote
from ._calls import Call, CallTiming

#: Batches of submitted calls aim to take about this long on a worker, which
#: amortises the per-batch cost while keeping batches short enough that
#: work stays spread over the workers.
TARGET_BATCH_SECONDS = 0.02
MAX_BATCH_CALLS = 4096
#: The most batches a second the executor aims to have the whole cluster run.
#: Each batch costs the process that runs the scheduler and settles results
#: a fixed amount of CPU, however many nodes there are (0.12-0.45 ms for
#: one-call batches on 2 cores: ``python -m benchmarks.central_cost``), so a
#: fixed batch length would make that load grow with every core (256 workers on 20 ms batches: 12,800 batches/s,
#: several cores' worth). So batches get longer once the cluster has more than
#: ``MAX_BATCHES_PER_SECOND`` x the target length worth of worker threads (20
#: for submitted calls, 500 for map chunks), keeping that process under about
#: half a core: see docs/scaling.rst.
MAX_BATCHES_PER_SECOND = 1000


def batch_seconds(target: float, threads: int) -> float:
    """How long a batch should take on a worker: ``target``, or longer on a
    cluster so large that the scheduler would handle more than
    ``MAX_BATCHES_PER_SECOND`` batches at that length."""
    return max(target, threads / MAX_BATCHES_PER_SECOND)


def batch_size(queued: int, per_call: float | None, threads: int) -> int:
    """How many submitted calls (or chunks of one map) go in the next batch,
    each measured to take ``per_call`` seconds, with ``queued`` waiting."""
    if per_call is None:
        return 1  # nothing measured yet: calls may be long, so spread them
    seconds = batch_seconds(TARGET_BATCH_SECONDS, threads)
    by_time = int(seconds / max(per_call, 1e-7))
    # Leave some of the queue for the other workers.
    fair_share = -(-queued // max(1, threads))
    # The cap on calls grows with the batch's length, or it would bind first.
    most = int(MAX_BATCH_CALLS * seconds / TARGET_BATCH_SECONDS)
    return max(1, min(by_time, fair_share, most))


class CallQueue:
    """Calls not yet sent, oldest first."""

    def __init__(self, call_timing: CallTiming, one_call_per_task: bool) -> None:
        self._lock = threading.Lock()
        self._calls: collections.deque[Call] = collections.deque()
        self._call_timing = call_timing
        # max_tasks_per_child counts submitted calls, so each is its own batch.
        self._one_call_per_task = one_call_per_task

    def __len__(self) -> int:
        return len(self._calls)

    def put(self, calls: list[Call]) -> None:
        with self._lock:
            self._calls.extend(calls)

    def futures(self) -> list:
        with self._lock:
            return [call.future for call in self._calls]

    def drain(self) -> list[Call]:
        """Take every call out (the executor is broken, or closing)."""
        with self._lock:
            calls = list(self._calls)
            self._calls.clear()
        return calls

    def take(self, room: int, threads: Callable[[], int]) -> list[list[Call]]:
        """Up to ``room`` batches' calls, each marked running: from here on
        they belong to the cluster, as in ``ProcessPoolExecutor`` once a
        call is handed to a worker. Cancelled calls are skipped."""
        batches: list[list[Call]] = []
        with self._lock:
            while self._calls and len(batches) < room:
                calls = self._take_batch_locked(threads)
                if calls:
                    batches.append(calls)
        return batches

    def _take_batch_locked(self, threads: Callable[[], int]) -> list[Call]:
        calls: list[Call] = []
        limit = None
        while self._calls:
            call = self._calls[0]
            if calls and not (call.kind == calls[0].kind and call.timing is calls[0].timing):
                break
            self._calls.popleft()
            if not call.notify():
                continue  # cancelled while queued
            calls.append(call)
            if call.kind == _remote.CHUNK and call.timing is None:
                break  # sized to keep a worker busy on its own (see _map)
            if limit is None:
                per_call = None if self._one_call_per_task else (call.timing or self._call_timing).seconds
                limit = batch_size(len(self._calls) + 1, per_call, threads())
            if len(calls) >= limit:
                break
        return calls
