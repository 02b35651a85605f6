"""How batches are handed to the nodes' agents (``_dispatch.AgentDispatch``).

Pure bookkeeping, driven by hand: no node is ever handed more batches than
it has members; waiting batches go out oldest first, to the freest nodes; a
batch a member or a whole node lost waits again at the front, and fails once
workers died running it more often than ``allowed-failures``.
"""

from __future__ import annotations

import random
from typing import Any

from sulis_executor._calls import Batch
from sulis_executor._dispatch import AgentDispatch


class _Pickled:
    payload = b"payload"
    handles: tuple[Any, ...] = ()


def batches(n: int, start: int = 0) -> list[Batch]:
    made = []
    for i in range(start, start + n):
        batch = Batch(f"b{i}", "calls", [], "f")
        batch.pickled = _Pickled()  # type: ignore[assignment]
        made.append(batch)
    return made


def keys(handouts: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[str]]:
    return {worker: [h[0] for h in handed] for worker, handed in handouts.items()}


def test_nodes_get_no_more_batches_than_members_and_the_rest_wait_in_order() -> None:
    dispatch = AgentDispatch(allowed_failures=3, has_initializer=False)
    assert dispatch.members_changed("n1", 2) == {}
    assert dispatch.members_changed("n2", 1) == {}
    handed = keys(dispatch.offer(batches(5)))
    assert sorted(len(v) for v in handed.values()) == [1, 2]
    assert sorted(k for v in handed.values() for k in v) == ["b0", "b1", "b2"]
    assert dispatch.count() == 5 and dispatch.members() == 3
    # n2 finishes its batch: the oldest waiting one goes to it.
    done_key = handed["n2"][0]
    batch, more = dispatch.done("n2", done_key)
    assert batch is not None and batch.batch_id == done_key
    assert keys(more) == {"n2": ["b3"]}
    assert dispatch.count() == 4


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
    handed = keys(dispatch.offer(batches(2)))
    assert handed == {"n1": ["b0"]}
    failed, again = dispatch.lost("n1", "b0")
    assert failed == [] and keys(again) == {"n1": ["b0"]}  # first again, before b1
    failed, again = dispatch.lost("n1", "b0")
    assert [b.batch_id for b in failed] == ["b0"] and keys(again) == {"n1": ["b1"]}
    assert dispatch.count() == 1


def test_a_lost_node_gives_back_what_it_held_and_its_members() -> None:
    dispatch = AgentDispatch(allowed_failures=3, has_initializer=False)
    dispatch.members_changed("n1", 2)
    dispatch.members_changed("n2", 2)
    handed = keys(dispatch.offer(batches(4)))
    failed, again = dispatch.node_lost("n1")
    assert failed == [] and again == {}  # n2 is full
    assert dispatch.members() == 2 and dispatch.count() == 4
    for key in handed["n2"]:
        dispatch.done("n2", key)
    assert sorted(b.batch_id for b in dispatch.batches()) == sorted(handed["n1"])


def test_running_totals_match_the_nodes_after_any_sequence_of_events() -> None:
    rng = random.Random(16)
    dispatch = AgentDispatch(allowed_failures=2, has_initializer=False)
    made = 0
    for _ in range(3000):
        event = rng.choice(["offer", "members", "done", "lost", "node_lost", "withdraw"])
        worker = f"n{rng.randrange(6)}"
        if event == "offer":
            dispatch.offer(batches(rng.randrange(1, 5), made))
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
        assert dispatch.count() == len(dispatch._ready) + sum(len(node.held) for node in nodes)
