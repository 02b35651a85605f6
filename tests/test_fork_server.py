"""Local workers are forked from one fork server, and behave as if started alone.

A local cluster is one node: its agent (a Dask worker) and its pool's
members (the processes that run calls; see ``sulis_executor._pool``), each
a worker process of the launcher's.

* Every worker is a child of one fork server, itself a child of the client.
* A killed worker is replaced by a new fork.
* A worker that keeps failing to start is given up, forked or not.
* Forked workers do not share numpy's global random numbers.
* Shutdown leaves neither workers nor the fork server behind.
* If the fork server dies, the cluster gets its workers back (started as
  fresh interpreters), and the client's private files stay.
* Where there is no fork server, workers are fresh interpreters.

The killed-client case (the workers remove the client's files) is in
``test_faults_local.py``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from sulis_executor import SulisDaskExecutor
from sulis_executor.launchers import _processes
from sulis_executor.launchers._processes import MAX_QUICK_DEATHS, WorkerProcesses
from sulis_executor.worker import process_start_time
from tests import executor_tasks as tasks
from tests.waiting import alive, wait_until

pytestmark = pytest.mark.timeout(90)


def worker_pids(ex: SulisDaskExecutor) -> set[int]:
    """The local cluster's worker processes: its agent and its members."""
    return set(ex._launcher.worker_pids())


def member_pids(ex: SulisDaskExecutor) -> set[int]:
    """Those that run calls: all but the agent, the Dask worker."""
    return worker_pids(ex) - set(ex.client.run(os.getpid, on_error="ignore").values())


def parents(pids: set[int]) -> set[int]:
    return {psutil.Process(pid).ppid() for pid in pids}


def test_workers_are_forked_from_one_fork_server_started_by_the_client() -> None:
    with SulisDaskExecutor(max_workers=2) as ex:
        workers = worker_pids(ex)
        assert len(workers) == 3 and len(member_pids(ex)) == 2
        (server,) = parents(workers)
        assert server != os.getpid()
        assert psutil.Process(server).ppid() == os.getpid()
        assert "sulis_executor._forkserver" in psutil.Process(server).cmdline()


def test_a_killed_forked_worker_is_replaced_by_a_new_fork() -> None:
    with SulisDaskExecutor(max_workers=2) as ex:
        workers = worker_pids(ex)
        (server,) = parents(workers)
        victim = min(member_pids(ex))
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(member_pids(ex) - {victim}) == 2, what="a replacement worker")
        replacement = worker_pids(ex) - workers
        assert len(replacement) == 1 and parents(replacement) == {server}
        assert sorted(ex.map(tasks.square, range(20))) == [i * i for i in range(20)]


def test_forked_workers_draw_different_numpy_random_numbers() -> None:
    with SulisDaskExecutor(max_workers=2) as ex:
        states = dict(ex.map(tasks.numpy_random_state, range(40), [0.01] * 40))
        assert len(states) == 2 and len(set(states.values())) == 2, states


def test_shutdown_leaves_neither_workers_nor_the_fork_server_behind(no_process_left: None) -> None:
    ex = SulisDaskExecutor(max_workers=2)
    workers = worker_pids(ex)
    (server,) = parents(workers)
    ex.shutdown(wait=True)
    # No wait: shutdown returns once every process it started is gone.
    assert not alive(workers | {server})


def test_when_the_fork_server_dies_its_workers_are_replaced_and_the_private_files_stay(
        no_process_left: None) -> None:
    with SulisDaskExecutor(max_workers=2) as ex:
        launcher = ex._launcher
        private = [Path(launcher._shared.path), Path(launcher._credentials.directory)]
        workers = worker_pids(ex)
        (server,) = parents(workers)
        os.kill(server, signal.SIGKILL)
        wait_until(lambda: not alive(workers), what="the fork server's workers to die with it")
        wait_until(lambda: len(worker_pids(ex) - workers) == 3, what="three new workers")
        # With no fork server, the new ones are fresh interpreters.
        assert parents(worker_pids(ex)) == {os.getpid()}
        assert sorted(ex.map(tasks.square, range(20))) == [i * i for i in range(20)]
        assert all(path.is_dir() for path in private), "a worker removed the live client's files"


def test_without_a_fork_server_workers_are_fresh_interpreters(
        monkeypatch: pytest.MonkeyPatch, no_process_left: None) -> None:
    monkeypatch.setattr(_processes, "fork_server_supported", lambda: False)  # as off Linux
    with SulisDaskExecutor(max_workers=2) as ex:
        workers = worker_pids(ex)
        assert len(workers) == 3 and parents(workers) == {os.getpid()}
        victim = min(member_pids(ex))
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(member_pids(ex) - {victim}) == 2, what="a replacement worker")
        assert sorted(ex.map(tasks.square, range(20))) == [i * i for i in range(20)]


# -- mp_context ----------------------------------------------------------------

def is_fresh_interpreter(pid: int) -> bool:
    return psutil.Process(pid).cmdline()[1:3] == ["-m", "sulis_executor.worker"]


@pytest.mark.parametrize("mp_context", ["spawn", multiprocessing.get_context("spawn")],
                         ids=["name", "context"])
def test_a_spawn_context_makes_every_worker_a_fresh_interpreter(
        mp_context: object, no_process_left: None) -> None:
    with SulisDaskExecutor(2, mp_context) as ex:
        workers = worker_pids(ex)
        assert len(workers) == 3 and parents(workers) == {os.getpid()}
        assert all(is_fresh_interpreter(pid) for pid in workers)
        assert list(ex.map(tasks.square, range(5))) == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("mp_context", ["fork", multiprocessing.get_context("forkserver")],
                         ids=["fork", "forkserver"])
def test_fork_contexts_fork_workers_from_the_fork_server_never_from_the_client(
        mp_context: object, no_process_left: None) -> None:
    with SulisDaskExecutor(2, mp_context) as ex:
        workers = worker_pids(ex)
        (server,) = parents(workers)
        assert server != os.getpid() and psutil.Process(server).ppid() == os.getpid()
        assert not any(is_fresh_interpreter(pid) for pid in workers)


def test_the_start_method_can_come_from_the_environment(
        monkeypatch: pytest.MonkeyPatch, no_process_left: None) -> None:
    monkeypatch.setenv("SULIS_EXECUTOR_MP_CONTEXT", "spawn")
    with SulisDaskExecutor(1) as ex:
        assert parents(worker_pids(ex)) == {os.getpid()}


@pytest.mark.parametrize("mp_context", [None, "spawn"], ids=["forked", "fresh-interpreter"])
def test_workers_leaving_after_max_tasks_per_child_are_replaced_either_way(
        no_process_left: None, mp_context: str | None) -> None:
    with SulisDaskExecutor(2, mp_context, max_tasks_per_child=2) as ex:
        pids = list(ex.map(tasks.pid_of_worker, range(16), chunksize=1))
        assert max(pids.count(pid) for pid in set(pids)) <= 2 and len(set(pids)) >= 8
        assert ex.submit(tasks.square, 3).result(timeout=30) == 9


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "fresh-interpreter"])
def test_a_slot_whose_worker_keeps_failing_to_start_is_given_up(
        fork: bool, no_process_left: None) -> None:
    starts: list[int] = []

    def failing_worker(slot: int, generation: int) -> list[str]:
        starts.append(generation)
        return ["tcp://127.0.0.1:1", "--interface", "no-such-interface0"]  # exit status 2

    workers = WorkerProcesses(1, failing_worker, fork=fork)
    workers.start()
    try:
        for thread in workers._threads:  # each slot's supervisor ends when it gives up
            thread.join(60)
        assert starts == list(range(MAX_QUICK_DEATHS))
        assert workers.pids() == []
    finally:
        workers.close(timeout=5)


def test_process_start_time_tells_a_running_process_from_an_exited_one() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    assert process_start_time(child.pid) is not None
    assert child.stdin is not None
    child.stdin.close()  # the child exits
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    assert process_start_time(child.pid) is None
    child.wait()
    assert process_start_time(child.pid) is None
