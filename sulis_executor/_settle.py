"""Turning a batch's result into the states of its futures.

A result is one ``bytes`` payload (see ``_remote._dumps_entries``): an
outcome per submitted call, or per map chunk, each pickled on its own, so
that one the client cannot unpickle fails its own call only. This runs in
the engine's results thread (its collector) only: an error unpickling
raises there, even ``SystemExit`` from a ``__reduce__``, can only come from
the object being rebuilt (signals reach the main thread), so it fails the
call and never ends the thread.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

from . import _remote
from ._calls import UNREADABLE_HERE, Batch, CallTiming, rebuild_exception, unpickling_failed


def deliver(batch: Batch, payload: Any, call_timing: CallTiming,
            broken: Callable[[str, str], BaseException]) -> float | None:
    """Settle ``batch``'s futures with its result, or with the error that
    stands for it (``payload`` is then an exception). A worker whose
    initializer failed refuses the batch: ``broken(message, traceback)``
    breaks the executor and gives the error its calls fail with. Returns
    the seconds the batch took on its worker, or None if it did not run."""
    if isinstance(payload, BaseException):
        batch.settle(payload)
        return None
    try:
        outcomes, seconds = read_outcomes(payload)
    except BaseException as error:  # noqa: BLE001 - not a payload of ours: a bug
        outcomes, seconds = [(UNREADABLE_HERE, error, "")], 0.0
    if outcomes[0][0] == _remote.BROKEN:
        _, message, tb = outcomes[0]
        batch.settle(broken(message, tb))
        return None
    if len(outcomes) != len(batch.calls):
        # The batch as a whole could not be read: all its calls fail so.
        outcomes = outcomes[:1] * len(batch.calls)
    elif batch.kind == _remote.CALLS:
        call_timing.observe(seconds / len(outcomes))
    elif batch.calls[0].timing is not None:
        batch.calls[0].timing.observe(seconds / len(outcomes))
    for call, outcome in zip(batch.calls, outcomes):
        tag = outcome[0]
        if tag == _remote.OK:
            call.set(outcome[1])
        elif tag == _remote.ERROR:
            call.set(rebuild_exception(outcome[1], outcome[2]), error=True)
        else:
            call.set(unpickling_failed(call, outcome, batch.name), error=True)
    return seconds


def read_outcomes(payload: Any) -> tuple[list[Any], float]:
    """A batch's outcomes, one per call or map chunk, and its ``seconds``.
    One that cannot be unpickled is ``(UNREADABLE_HERE, the error, "")``,
    whatever the error."""
    view, ends, seconds = _remote.read_entries(payload)
    outcomes = []
    start = 0
    for end in ends:
        try:
            outcomes.append(pickle.loads(view[start:end]))
        except BaseException as error:  # noqa: BLE001 - see the module's docstring
            outcomes.append((UNREADABLE_HERE, error, ""))
        start = end
    return outcomes, seconds
