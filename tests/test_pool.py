"""A node's pool on its own: an agent's :class:`Pool` in this process and real
member processes joined to it (``_pool.serve``), no Dask cluster.

A Dask task carrying the executor's batch (one that holds Dask data) runs in
a member; if the member dies running it, the task runs again in another, as
Dask runs again the task of a worker that died, up to
``distributed.scheduler.allowed-failures`` deaths; then it fails with a
``BrokenProcessPool`` subclass.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import cloudpickle
import dask.config
import pytest

from sulis_executor._pool import MemberDiedError, Pool, serve
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)


def _member(path: str) -> None:
    serve(path, token="test")


def die_the_first_time(marker: str) -> int:
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(9)
    return os.getpid()


def always_die() -> None:
    os._exit(9)


@pytest.fixture
def pool_of_three(tmp_path: Path) -> Iterator[tuple[Pool, list[multiprocessing.Process]]]:
    events: list[object] = []
    pool = Pool(str(tmp_path / "pool"), events.append)
    pool.start()
    context = multiprocessing.get_context("spawn")
    members = [context.Process(target=_member, args=(pool.path,)) for _ in range(3)]
    for member in members:
        member.start()
    wait_until(lambda: pool.size == 3, what="three members joined")
    yield pool, members
    pool.close()
    for member in members:
        member.join(10)
        if member.is_alive():
            member.kill()


def test_a_task_whose_member_dies_runs_again_in_another_member(
        pool_of_three: tuple[Pool, list[multiprocessing.Process]], tmp_path: Path) -> None:
    pool, members = pool_of_three
    marker = str(tmp_path / "died-once")
    future = pool.put_call(cloudpickle.dumps((die_the_first_time, (marker,), {})))
    survivor = future.result(timeout=60)
    assert os.path.exists(marker)
    dead = [m.pid for m in members if not m.is_alive() or m.exitcode is not None]
    assert survivor not in dead and survivor in {m.pid for m in members}


def test_a_task_that_kills_every_member_fails_as_a_dead_worker_after_the_allowed_failures(
        pool_of_three: tuple[Pool, list[multiprocessing.Process]]) -> None:
    pool, members = pool_of_three
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        future = pool.put_call(cloudpickle.dumps((always_die, (), {})))
        error = future.exception(timeout=60)
    assert isinstance(error, MemberDiedError) and isinstance(error, BrokenProcessPool)
    assert "died 2 times" in str(error) and "allowed-failures" in str(error)
    # Two members died for it (the pool hears of a death as the process
    # ends: wait for the second to be gone); the third is still there.
    wait_until(lambda: sum(not m.is_alive() for m in members) >= 2, what="two members gone")
    assert sum(not m.is_alive() for m in members) == 2
    assert pool.size == 1


def _member_for_one_task(path: str) -> None:
    serve(path, token="test", max_tasks=1)


def test_a_member_leaving_after_its_last_task_is_given_no_other(tmp_path: Path) -> None:
    # max_tasks_per_child: the member exits after its reply. The next task
    # must wait for a new member, not go to the leaving one and be lost with
    # it (which would count as a death: with no failures allowed, fail it).
    pool = Pool(str(tmp_path / "pool"), lambda event: None)
    pool.start()
    context = multiprocessing.get_context("spawn")
    started = []
    try:
        with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
            first = context.Process(target=_member_for_one_task, args=(pool.path,))
            first.start()
            started.append(first)
            wait_until(lambda: pool.size == 1, what="the first member joined")
            futures = [pool.put_call(cloudpickle.dumps((os.getpid, (), {}))) for _ in range(2)]
            assert futures[0].result(timeout=60) == first.pid
            first.join(30)
            second = context.Process(target=_member_for_one_task, args=(pool.path,))
            second.start()
            started.append(second)
            assert futures[1].result(timeout=60) == second.pid
    finally:
        pool.close()
        for member in started:
            member.join(10)
            if member.is_alive():
                member.kill()


def test_closing_a_pool_whose_thread_has_ended_is_harmless(tmp_path: Path) -> None:
    # close() wakes the pool's thread after marking the pool closed; if the
    # thread already saw the mark (a member hung up meanwhile) it has closed
    # its wake pipe, and the wake must not write to a closed descriptor. A
    # second close() meets that state every time.
    pool = Pool(str(tmp_path / "pool"), lambda event: None)
    pool.start()
    pool.close()
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.put_call(cloudpickle.dumps((os.getpid, (), {})))
