"""Packing queued calls into batches: one pickled payload per batch.

A call that cannot be pickled fails alone, with its own error (see
``_calls.pickling_error``); the other calls of its batch are sent without it.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Callable

import cloudpickle

from ._calls import Batch, Call, CallTiming, expected_seconds, function_name, pickling_error
from ._shared import Pickled, SharedBuffers
from .errors import BrokenSulisExecutor


class Packer:
    def __init__(self, shared: SharedBuffers, call_timing: CallTiming, inline_whole: bool,
                 collector: Callable[[], threading.Thread | None]) -> None:
        self._shared = shared
        self._call_timing = call_timing  # the executor's submitted calls' (see expected_seconds)
        # Runners of the nodes' pools read no Dask data: a large batch is
        # shared through a buffer, never "as a whole" by Dask (see _shared).
        self._inline_whole = inline_whole
        self._collector = collector
        self._counter = itertools.count()

    def pack(self, calls: list[Call]) -> tuple[Batch, Pickled] | None:
        """A batch of these calls and its pickled payload; ``None`` if none
        of them could be pickled (those calls are failed)."""
        name = function_name(calls[0].body[0])
        batch = Batch(f"{name}-{next(self._counter)}-{uuid.uuid4().hex[:12]}", calls[0].kind, calls, name)
        try:
            pickled = self._shared.dumps([c.body for c in calls], inline_whole=self._inline_whole)
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
                    call.set(pickling_error(call, error), error=True)
            if len(good) == len(calls):
                # Every call pickles alone: sharing a buffer with the cluster
                # failed, not pickling. Fail the batch rather than retry.
                batch.settle(BrokenSulisExecutor(f"could not send work to the cluster: {failure}"))
                return None
            return self.pack(good) if good else None
        batch.shared_keys = pickled.keys
        batch.expected = expected_seconds(calls, self._call_timing)
        for call in calls:
            call.batch = batch
        return batch, pickled

    def _fails_the_call(self, error: BaseException) -> bool:
        """Whether an error raised while pickling calls fails those calls.

        Any ``Exception`` does. A ``KeyboardInterrupt`` or ``SystemExit``
        does too when the collector thread is pickling (the calls that
        waited for room): there it can only come from an object's
        ``__reduce__`` (signals reach the main thread), and the collector
        must not die, or every future would hang. In the caller's thread it
        is the user's Ctrl-C, and it propagates.
        """
        return isinstance(error, Exception) or threading.current_thread() is self._collector()
