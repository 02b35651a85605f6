"""How batches are handed to the nodes' agents (``_dispatch.AgentDispatch``).

Pure bookkeeping, driven by hand: a node is handed a batch per free member,
and short batches up to two per member (one to run, one to wait in its
pool); waiting batches go out oldest first, to the freest nodes; a batch a
member or a whole node lost waits again at the front, and fails once
workers died running it more often than ``allowed-failures``.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from sulis_executor import _remote
from sulis_executor._calls import Batch, Call, CallTiming, expected_seconds
from sulis_executor._dispatch import HELD_PER_MEMBER, SHORT_BATCH_SECONDS, AgentDispatch

SHORT = 0.05
LONG = 2 * SHORT_BATCH_SECONDS


class _Pickled:
    payload = b"payload"
    handles: tuple[Any, ...] = ()


def batches(n: int, start: int = 0, expected: float | None = SHORT) -> list[Batch]:
    made = []
    for i in range(start, start + n):
        batch = Batch(f"b{i}", "calls", [], "f")
        batch.pickled = _Pickled()  # type: ignore[assignment]
        batch.expected = expected
        made.append(batch)
    return made


def keys(handouts: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[str]]:
    return {worker: [h[0] for h in handed] for worker, handed in handouts.items()}


def test_nodes_get_two_short_batches_per_member_and_the_rest_wait_in_order() -> None:
    assert HELD_PER_MEMBER == 2
    dispatch = AgentDispatch(allowed_failures=3, has_initializer=False)
    assert dispatch.members_changed("n1", 2) == {}
    assert dispatch.members_changed("n2", 1) == {}
    handed = keys(dispatch.offer(batches(8)))
    # Each member has one batch to run and one waiting in its node's pool.
    assert {worker: len(v) for worker, v in handed.items()} == {"n1": 4, "n2": 2}
    assert sorted(k for v in handed.values() for k in v) == [f"b{i}" for i in range(6)]
    assert dispatch.count() == 8 and dispatch.members() == 3
    # n2 finishes a batch: the oldest waiting one goes to it.
    done_key = handed["n2"][0]
    batch, more = dispatch.done("n2", done_key)
    assert batch is not None and batch.batch_id == done_key
    assert keys(more) == {"n2": ["b6"]}
    assert dispatch.count() == 7


@pytest.mark.parametrize("expected", [LONG, None], ids=["long", "not measured"])
def test_long_or_unmeasured_batches_go_only_to_free_members(expected: float | None) -> None:
    dispatch = AgentDispatch(allowed_failures=3, has_initializer=False)
    dispatch.members_changed("n1", 2)
    dispatch.members_changed("n2", 1)
    handed = keys(dispatch.offer(batches(5, expected=expected)))
    assert {worker: len(v) for worker, v in handed.items()} == {"n1": 2, "n2": 1}
    # A short batch behind them waits too: oldest first.
    assert dispatch.offer(batches(1, 5)) == {}
    assert keys(dispatch.done("n2", handed["n2"][0])[1]) == {"n2": ["b3"]}


def test_work_spreads_to_the_freest_node_first() -> None:
    dispatch = AgentDispatch(allowed_failures=3, has_initializer=False)
    dispatch.members_changed("small", 1)
    dispatch.members_changed("big", 4)
    handed = keys(dispatch.offer(batches(2)))
    # One each, round the nodes from the freest: no node takes a second batch
    # while another has a free member and nothing.
    assert handed == {"big": ["b0"], "small": ["b1"]}


def test_a_lost_batch_waits_again_first_and_fails_after_the_allowed_deaths() -> None:
    dispatch = AgentDispatch(allowed_failures=1, has_initializer=False)
    dispatch.members_changed("n1", 1)
    handed = keys(dispatch.offer(batches(3)))
    assert handed == {"n1": ["b0", "b1"]}
    failed, again = dispatch.lost("n1", "b0")
    assert failed == [] and keys(again) == {"n1": ["b0"]}  # first again, before b2
    failed, again = dispatch.lost("n1", "b0")
    assert [b.batch_id for b in failed] == ["b0"] and keys(again) == {"n1": ["b2"]}
    assert dispatch.count() == 2


def test_a_lost_node_gives_back_what_it_held_and_its_members() -> None:
    dispatch = AgentDispatch(allowed_failures=3, has_initializer=False)
    dispatch.members_changed("n1", 2)
    dispatch.members_changed("n2", 2)
    handed = keys(dispatch.offer(batches(8)))
    failed, again = dispatch.node_lost("n1")
    assert failed == [] and again == {}  # n2 is full
    assert dispatch.members() == 2 and dispatch.count() == 8
    for key in handed["n2"]:
        dispatch.done("n2", key)
    assert sorted(b.batch_id for b in dispatch.batches()) == sorted(handed["n1"])


def test_a_lost_node_counts_a_death_only_against_the_batches_its_members_ran() -> None:
    # The pool runs batches in the order handed: with 2 members, the node's
    # first 2 batches were running, the other 2 still waited in its pool, and
    # a batch that never ran must not come closer to failing for a death.
    dispatch = AgentDispatch(allowed_failures=0, has_initializer=False)
    dispatch.members_changed("n1", 2)
    dispatch.members_changed("n2", 2)
    handed = keys(dispatch.offer(batches(8)))
    dispatch.done("n1", handed["n1"][0])  # now running: n1's 2nd and 3rd
    running, waiting = handed["n1"][1:3], handed["n1"][3:]
    failed, _ = dispatch.node_lost("n1")
    assert sorted(b.batch_id for b in failed) == sorted(running)
    assert [b.batch_id for b in dispatch._ready] == waiting  # to run elsewhere, deaths 0


def test_running_totals_match_the_nodes_after_any_sequence_of_events() -> None:
    rng = random.Random(16)
    dispatch = AgentDispatch(allowed_failures=2, has_initializer=False)
    made = 0
    for _ in range(3000):
        event = rng.choice(["offer", "members", "done", "lost", "node_lost", "withdraw"])
        worker = f"n{rng.randrange(6)}"
        if event == "offer":
            dispatch.offer(batches(rng.randrange(1, 5), made, rng.choice([SHORT, LONG, None])))
            made += 5
        elif event == "members":
            dispatch.members_changed(worker, rng.randrange(0, 5))
        elif event == "withdraw":
            dispatch.withdraw({f"b{rng.randrange(made + 1)}"})
        else:
            node = dispatch._nodes.get(worker)
            if node is None or not node.held:
                continue
            key = rng.choice(list(node.held))
            if event == "done":
                dispatch.done(worker, key)
            elif event == "lost":
                dispatch.lost(worker, key)
            else:
                dispatch.node_lost(worker)
        nodes = dispatch._nodes.values()
        assert dispatch.members() == sum(node.members for node in nodes)
        # Nothing waits here while some node would take the oldest batch.
        assert not dispatch._ready or not any(node.takes(dispatch._ready[0]) for node in nodes), event
        assert dispatch.count() == len(dispatch._ready) + sum(len(node.held) for node in nodes)


def call(kind: str, timing: CallTiming | None = None, expected: float | None = None) -> Call:
    made = Call(kind, None, timing=timing)
    made.expected = expected
    return made


def test_a_batch_is_expected_to_take_its_calls_measured_times() -> None:
    executor_timing, map_timing = CallTiming(), CallTiming()
    submitted = [call(_remote.CALLS), call(_remote.CALLS)]
    assert expected_seconds(submitted, executor_timing) is None  # nothing measured yet
    executor_timing.observe(0.25)
    assert expected_seconds(submitted, executor_timing) == 0.5
    # Chunks of an explicit chunksize: their map's timing, per chunk.
    chunks = [call(_remote.CHUNK, map_timing)] * 3
    assert expected_seconds(chunks, executor_timing) is None
    map_timing.observe(0.1)
    assert expected_seconds(chunks, executor_timing) == pytest.approx(0.3)
    # An automatic chunk: what its map expects of it, or nothing.
    assert expected_seconds([call(_remote.CHUNK, expected=0.7)], executor_timing) == 0.7
    assert expected_seconds([call(_remote.CHUNK)], executor_timing) is None
