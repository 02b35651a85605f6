"""Short calls wait in a node's pool, so that a member that finishes starts
the next at once, without a round trip to the executor's process.

Every batch reaches a node through the scheduler's event loop, which runs
in the executor's process (see ``_dispatch``). These tests hold that loop
still: what a member can start then is only what its node's pool already
had. Calls measured short are there (one per member beyond those running);
calls not measured yet, which may be long, are not: they wait in the one
queue all nodes take from.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sulis_executor import SulisDaskExecutor
from tests import contract_helpers as h
from tests import executor_tasks as tasks
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)


@contextmanager
def scheduler_loop_held(ex: SulisDaskExecutor) -> Iterator[None]:
    """Keep the scheduler's event loop (in this process) busy until the
    block ends: no batch is handed to a node meanwhile, no result heard."""
    loop = ex._engine._agents._scheduler.loop  # type: ignore[union-attr]
    held, free = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        free.wait(60)

    loop.add_callback(hold)
    assert held.wait(30), "the scheduler's loop never ran the hold"
    try:
        yield
    finally:
        free.set()


def gated_calls(ex: SulisDaskExecutor, directory: Path, n: int) -> list:
    return [ex.submit(h.block, str(directory / f"{i}.started"), str(directory / f"{i}.release"), i)
            for i in range(n)]


def started(directory: Path) -> set[int]:
    return {int(p.name.split(".")[0]) for p in directory.glob("*.started")}


def test_a_member_starts_its_next_short_call_from_its_pool(tmp_path):
    with SulisDaskExecutor(max_workers=2) as ex:
        # Calls measured short: each batch is expected to take milliseconds.
        assert [f.result(timeout=30) for f in [ex.submit(tasks.square, i) for i in range(20)]] == [
            i * i for i in range(20)]
        calls = gated_calls(ex, tmp_path, 4)
        wait_until(lambda: started(tmp_path) == {0, 1}, 30, "calls 0 and 1 to start")
        with scheduler_loop_held(ex):
            (tmp_path / "0.release").touch()
            # Call 2 was already in the pool: the member that ran call 0
            # starts it, while the loop that would have handed it is held.
            wait_until(lambda: 2 in started(tmp_path), 30, "call 2 to start with the loop held")
            assert 3 not in started(tmp_path)  # call 1 still runs
        (tmp_path / h.RELEASE_ALL).touch()
        assert [f.result(timeout=30) for f in calls] == [0, 1, 2, 3]


def test_calls_not_measured_yet_wait_for_a_free_member_outside_the_pool(tmp_path):
    with SulisDaskExecutor(max_workers=2) as ex:
        calls = gated_calls(ex, tmp_path, 3)  # the first calls: nothing measured
        wait_until(lambda: started(tmp_path) == {0, 1}, 30, "calls 0 and 1 to start")
        dispatch = ex._engine._agents._dispatch  # type: ignore[union-attr]
        held = {key for node in dispatch._nodes.values() for key in node.held}
        waiting = [batch.batch_id for batch in dispatch._ready]
        # Call 2 may be long: it waits here for the first member of any node
        # to be free, not in the pool of a node whose members are busy.
        assert len(held) == 2 and len(waiting) == 1
        assert calls[2] in [call.future for batch in dispatch._ready for call in batch.calls]
        (tmp_path / h.RELEASE_ALL).touch()
        assert [f.result(timeout=30) for f in calls] == [0, 1, 2]
