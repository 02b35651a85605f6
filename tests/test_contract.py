"""The `concurrent.futures` executor contract, checked against both executors.

In the spirit of CPython's ``Lib/test/test_concurrent_futures/``: every test
in the first part runs twice, through the parametrized ``executor`` fixture,
once on :class:`concurrent.futures.ProcessPoolExecutor` (the reference) and
once on :class:`SulisDaskExecutor` attached to the session cluster. A drop-in
replacement must pass wherever the reference passes. The last part holds
Sulis-only checks (``map(buffersize=)``, which Python 3.11's
ProcessPoolExecutor lacks, cluster-side bookkeeping, an executor's own
cluster).

No test sleeps to synchronise. Tasks that must stay running block on a gate
file in ``tmp_path`` (see ``contract_helpers.block``) and mark a "started"
file; tests poll for those with a deadline. At teardown the ``executor``
fixture opens every gate before shutting the executor down. Both executors have 2 workers.
The reference executor forks its workers from a forkserver, so it never
forks this multi-threaded (Dask client) process.
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import os
import pickle
import socket
import threading
import time
import traceback
import weakref
from concurrent import futures
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

from sulis_executor import (
    BrokenSulisExecutor,
    RemoteTraceback,
    SulisDaskExecutor,
    UnpicklableError,
    UnpicklingFailedError,
)
from tests import contract_helpers as h
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

MB = 1_000_000


# -- fixtures and helpers ----------------------------------------------------


class Gate:
    """A task that blocks until the test releases it."""

    def __init__(self, directory: Path, name: str) -> None:
        self.started = directory / f"{name}.started"
        self.release_file = directory / f"{name}.release"

    def submit(self, ex, value=None) -> futures.Future:
        return ex.submit(h.block, str(self.started), str(self.release_file), value)

    def wait_started(self, timeout: float = 15.0) -> None:
        wait_until(self.started.exists, timeout, f"{self.started.name}")

    def release(self) -> None:
        self.release_file.touch()


@pytest.fixture
def gate_dir(tmp_path: Path) -> Path:
    d = tmp_path / "gates"
    d.mkdir()
    return d


@pytest.fixture
def make_gate(gate_dir: Path):
    names = (f"gate{i}" for i in itertools.count())
    return lambda: Gate(gate_dir, next(names))


@pytest.fixture(params=["ProcessPoolExecutor", "SulisDaskExecutor", "SulisDaskExecutor-local"])
def executor(request, gate_dir: Path, scheduler_address):
    """The reference, ours attached to the session's cluster, and ours with a
    local cluster of its own: only a cluster whose scheduler runs in the
    executor's process hands batches to its nodes' pools (see ``_agent``)."""
    # scheduler_address: start the session cluster before any per-test thread
    # bookkeeping, even for the reference executor.
    if request.param == "ProcessPoolExecutor":
        ex = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("forkserver"))
    elif request.param == "SulisDaskExecutor-local":
        ex = SulisDaskExecutor(max_workers=2)
    else:
        ex = request.getfixturevalue("shared_executor")
    yield ex
    # Open every gate first, so that no blocked task can stall the shutdown.
    (gate_dir / h.RELEASE_ALL).touch()
    ex.shutdown(wait=True, cancel_futures=True)


def is_sulis(ex) -> bool:
    return isinstance(ex, SulisDaskExecutor)


@pytest.fixture(params=["attached", "local"])
def buffered_executor(request, gate_dir: Path):
    """For ``buffersize`` tests: only SulisDaskExecutor (attached to the
    session's cluster, and with its own), since ProcessPoolExecutor gains
    ``buffersize`` in Python 3.14 and the suite runs on older Pythons too
    (collected, not skipped, so CI shows no skips)."""
    if request.param == "local":
        ex = SulisDaskExecutor(max_workers=2)
    else:
        ex = request.getfixturevalue("shared_executor")
    yield ex
    (gate_dir / h.RELEASE_ALL).touch()
    ex.shutdown(wait=True, cancel_futures=True)


def occupy_workers(ex, make_gate) -> list[Gate]:
    """Block both workers, and return once both blocking tasks run.

    ProcessPoolExecutor also moves max_workers + 1 further calls into its call
    queue, where they count as running and cannot be cancelled; three quick
    fillers take those places, so the next submission is truly pending.
    """
    gates = [make_gate(), make_gate()]
    for g in gates:
        g.submit(ex)
    for g in gates:
        g.wait_started()
    for _ in range(3):
        ex.submit(h.identity, None)
    return gates


# -- submit ------------------------------------------------------------------


def test_submit_returns_a_future_that_resolves_to_the_result(executor):
    future = executor.submit(h.square, 7)
    assert isinstance(future, futures.Future)
    assert future.result(timeout=30) == 49
    assert future.done() and not future.cancelled() and not future.running()
    assert future.exception() is None


def test_submit_passes_positional_and_keyword_arguments_untouched(executor):
    kwargs = dict(
        key="k", workers=3, pure=True, retries=7, priority=9, resources={"GPU": 1},
        fn="not the function", self="not the executor", timeout=1,
    )
    args, got = executor.submit(h.echo_call, 1, "two", [3], **kwargs).result(timeout=30)
    assert args == (1, "two", [3])
    assert got == kwargs


def test_identical_calls_are_each_run(executor, tmp_path):
    path = tmp_path / "calls"
    fs = [executor.submit(h.record, str(path), 5) for _ in range(6)]
    assert [f.result(timeout=30) for f in fs] == [5] * 6
    assert path.read_text().count("x") == 6


def test_exception_comes_back_with_its_type_and_remote_traceback(executor):
    future = executor.submit(h.raise_contract_error, "boom")
    with pytest.raises(h.ContractError, match="boom") as info:
        future.result(timeout=30)
    assert isinstance(future.exception(), h.ContractError)
    cause = info.value.__cause__
    assert cause is not None
    assert "raise_contract_error" in str(cause)
    if is_sulis(executor):
        assert isinstance(cause, RemoteTraceback)


def test_unpicklable_argument_fails_the_future_naming_the_type(executor):
    future = executor.submit(h.identity, threading.Lock())
    exc = future.exception(timeout=30)
    assert isinstance(exc, (TypeError, pickle.PicklingError))
    assert "lock" in str(exc).lower()
    if is_sulis(executor):
        assert "positional argument 0 of identity(), of type _thread.lock" in notes(exc)
    # The executor stays usable.
    assert executor.submit(h.square, 3).result(timeout=30) == 9


def test_unpicklable_result_fails_the_future_without_hanging(executor):
    future = executor.submit(h.make_lock)
    exc = future.exception(timeout=30)
    assert isinstance(exc, (TypeError, pickle.PicklingError))
    assert "lock" in str(exc).lower()
    assert executor.submit(h.square, 4).result(timeout=30) == 16


def test_every_call_gets_its_own_copy_of_its_arguments(executor):
    shared = [0]
    futures = [executor.submit(h.append_and_count, shared, i) for i in range(50)]
    # Calls submitted back to back may travel together; none sees another's change.
    assert [f.result(timeout=30) for f in futures] == [2] * 50
    assert shared == [0]


def test_large_arguments_and_results_round_trip(executor):
    data = os.urandom(20 * MB)
    assert executor.submit(h.nbytes, data).result(timeout=30) == len(data)
    assert executor.submit(h.identity, data).result(timeout=30) == data
    assert executor.submit(h.make_bytes, 20 * MB).result(timeout=30) == b"\x07" * (20 * MB)


def test_submitted_results_are_not_kept_alive_by_the_executor(executor):
    future = executor.submit(h.make_dummy)
    obj = future.result(timeout=30)
    ref = weakref.ref(obj)
    del obj, future
    gc.collect()
    wait_until(lambda: ref() is None, 5, "the result object to be freed")


# -- map ---------------------------------------------------------------------


def test_map_returns_results_in_input_order(executor):
    assert list(executor.map(h.square, range(100))) == [i * i for i in range(100)]


def test_map_over_several_iterables_stops_at_the_shortest(executor):
    result = executor.map(h.add3, range(10), range(100, 105), itertools.count(1000))
    assert list(result) == [1100 + 3 * i for i in range(5)]


def test_map_over_an_empty_iterable_returns_an_empty_iterator(executor):
    assert list(executor.map(h.square, [])) == []
    assert list(executor.map(h.square, [], chunksize=5)) == []


def test_map_accepts_a_generator(executor):
    gen = (i for i in range(20))
    assert list(executor.map(h.square, gen)) == [i * i for i in range(20)]


def test_map_with_chunksize_over_many_items(executor):
    n = 2000
    assert list(executor.map(h.square, range(n), chunksize=97)) == [i * i for i in range(n)]


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_delivers_results_up_to_the_first_exception_then_raises_it(executor, chunksize):
    results = []
    with pytest.raises(h.ContractError, match="item 5 failed") as info:
        for r in executor.map(h.fail_on, range(10), itertools.repeat(5), chunksize=chunksize):
            results.append(r)
    # With chunks, the results of the failing chunk's earlier items may be
    # lost (ProcessPoolExecutor fails the whole chunk), never reordered.
    assert results == list(range(len(results)))
    assert len(results) >= 5 - 5 % chunksize
    assert "fail_on" in str(info.value.__cause__)


def test_items_of_one_chunk_arrive_as_one_object_and_chunks_apart(executor):
    # The same list as every item grows within a chunk and starts afresh in
    # the next, also for short chunks, which travel to the cluster together.
    same = []
    counts = list(executor.map(h.append_and_count, [same] * 900, itertools.repeat(0), chunksize=3))
    assert counts == [1, 2, 3] * 300


def test_map_with_a_small_chunksize_raises_a_late_error_at_its_chunk(executor):
    results = []
    with pytest.raises(h.ContractError, match="item 700 failed"):
        for r in executor.map(h.fail_on, range(900), itertools.repeat(700), chunksize=3):
            results.append(r)
    assert results == list(range(len(results)))
    assert 700 - 700 % 3 <= len(results) <= 700


def test_map_rejects_a_chunksize_below_one(executor):
    with pytest.raises(ValueError):
        executor.map(h.square, range(3), chunksize=0)


def test_map_timeout_counts_from_the_original_call(executor, make_gate):
    gate = make_gate()
    timeout = 1.5
    started = time.monotonic()
    results = executor.map(
        h.block, [str(gate.started)], [str(gate.release_file)], timeout=timeout
    )
    # Spend most of the timeout before asking for the first result: waiting
    # for elapsed time is what is being tested here, not synchronisation.
    time.sleep(1.0)
    asked = time.monotonic()
    with pytest.raises(futures.TimeoutError):
        next(results)
    now = time.monotonic()
    assert now - started >= timeout - 0.05
    assert now - asked < timeout - 0.3, "the timeout was counted from next(), not from map()"


def test_map_timeout_delivers_the_results_that_came_in_time(executor, gate_dir):
    results = []
    with pytest.raises(futures.TimeoutError):
        for r in executor.map(
            h.map_item, range(3), itertools.repeat(str(gate_dir)), itertools.repeat((2,)), timeout=2
        ):
            results.append(r)
    assert results == [0, 1]


@pytest.mark.parametrize("how", ["close", "drop"])
def test_abandoning_the_map_iterator_cancels_the_calls_not_yet_started(executor, gate_dir, how):
    n = 20
    d = gate_dir
    # Item 0 returns at once; every other item blocks on its gate.
    results = executor.map(
        h.map_item, range(n), itertools.repeat(str(d)), itertools.repeat(tuple(range(1, n)))
    )
    assert next(results) == 0

    def started() -> set[int]:
        return {i for i in range(n) if (d / f"{i}.started").exists()}

    wait_until(lambda: len(started()) == 2, 15, "two items to block both workers")
    if how == "close":
        results.close()
    else:
        del results
        gc.collect()
    (d / h.RELEASE_ALL).touch()
    # Later work queues behind anything the workers were still given.
    assert [f.result(timeout=30) for f in [executor.submit(h.square, i) for i in range(4)]] == [0, 1, 4, 9]
    executor.shutdown(wait=True)
    ran = {i for i in range(n) if (d / f"{i}.ran").exists()}
    assert 0 in ran
    # Both executors hand a few calls to the workers ahead of time, where they
    # count as running and may still run (ProcessPoolExecutor: max_workers + 1
    # of them); the rest must never run.
    assert len(ran) <= 1 + 2 + 3, f"cancelled items ran: {sorted(ran)}"


def test_map_results_are_not_kept_alive_by_the_iterator(executor):
    # CPython's test_free_reference (bpo-14406).
    for obj in executor.map(h.make_dummy, range(10)):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        wait_until(lambda ref=ref: ref() is None, 5, "the yielded result to be freed")


# -- shutdown ----------------------------------------------------------------


def test_submit_after_shutdown_raises_runtime_error(executor):
    executor.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(h.square, 2)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.map(h.square, [1, 2])


def test_shutdown_is_idempotent(executor):
    assert executor.submit(h.square, 2).result(timeout=30) == 4
    executor.shutdown(wait=True)
    executor.shutdown(wait=True)
    executor.shutdown(wait=False)
    executor.shutdown(wait=True, cancel_futures=True)


def test_with_statement_shuts_down_and_waits_for_submitted_work(executor):
    with executor as ex:
        assert ex is executor
        fs = [ex.submit(h.sleep_then_return, 0.2, i) for i in range(4)]
    assert all(f.done() for f in fs)
    assert [f.result() for f in fs] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(h.square, 2)


def test_shutdown_wait_true_waits_for_running_and_pending_work(executor):
    fs = [executor.submit(h.sleep_then_return, 0.2, i) for i in range(5)]
    executor.shutdown(wait=True)
    assert all(f.done() and not f.cancelled() for f in fs)
    assert [f.result() for f in fs] == list(range(5))


def test_shutdown_wait_false_returns_at_once_and_running_work_completes(executor, make_gate):
    gate = make_gate()
    future = gate.submit(executor, "finished")
    gate.wait_started()
    began = time.monotonic()
    executor.shutdown(wait=False)
    assert time.monotonic() - began < 2.0
    assert not future.done()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(h.square, 2)
    gate.release()
    assert future.result(timeout=30) == "finished"


def test_shutdown_cancel_futures_cancels_the_pending_futures(executor, make_gate, tmp_path):
    gates = occupy_workers(executor, make_gate)
    paths = [tmp_path / f"pending{i}" for i in range(6)]
    fs = [executor.submit(h.record, str(p), i) for i, p in enumerate(paths)]
    executor.shutdown(wait=False, cancel_futures=True)
    # ProcessPoolExecutor cancels from its manager thread, so asynchronously.
    wait_until(fs[-1].cancelled, 10, "the last pending future to be cancelled")
    for g in gates:
        g.release()
    # (Not futures.wait: ProcessPoolExecutor never notifies waiters of the
    # futures that shutdown cancels, a CPython quirk.)
    for i, f in enumerate(fs):
        if not f.cancelled():
            assert f.result(timeout=30) == i
    executor.shutdown(wait=True)
    for f, p in zip(fs, paths):
        assert f.done()
        if f.cancelled():
            assert not p.exists(), "a cancelled call ran"
    if is_sulis(executor):
        assert all(f.cancelled() for f in fs)


@pytest.mark.parametrize("wait", [True, False])
def test_map_results_can_be_read_after_shutdown(executor, wait):
    # The Sulis page's concurrent.futures example prints its map's results
    # after the with block. Far more items than the executor's window.
    results = executor.map(h.square, range(3000))
    executor.shutdown(wait=wait)
    assert list(results) == [x * x for x in range(3000)]
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.map(h.square, [1])


def test_map_cut_by_shutdown_with_cancel_futures_raises_cancelled_error(executor, make_gate):
    gates = occupy_workers(executor, make_gate)
    results = executor.map(h.square, range(3000))
    executor.shutdown(wait=False, cancel_futures=True)
    for g in gates:
        g.release()
    read = []
    with pytest.raises(futures.CancelledError):
        for value in results:
            read.append(value)
    assert read == [x * x for x in range(len(read))]
    assert len(read) < 3000


# -- future states -----------------------------------------------------------


def test_future_is_running_while_its_task_runs_and_cannot_be_cancelled(executor, make_gate):
    gate = make_gate()
    future = gate.submit(executor, 42)
    gate.wait_started()
    wait_until(future.running, 10, "future.running()")
    assert not future.done()
    assert future.cancel() is False
    assert future.running() and not future.cancelled()
    gate.release()
    assert future.result(timeout=30) == 42
    assert not future.running()


def test_cancel_of_a_finished_future_returns_false(executor):
    future = executor.submit(h.square, 5)
    assert future.result(timeout=30) == 25
    assert future.cancel() is False
    assert not future.cancelled()
    assert future.result() == 25


def test_cancel_of_a_pending_future_succeeds_and_its_call_never_runs(executor, make_gate, tmp_path):
    gates = occupy_workers(executor, make_gate)
    marker = tmp_path / "cancelled-call-ran"
    future = executor.submit(h.record, str(marker), "ran")
    assert not future.running()
    assert future.cancel() is True
    assert future.cancelled() and future.done()
    with pytest.raises(futures.CancelledError):
        future.result(timeout=1)
    # Work submitted after it still runs; once it has, the cancelled call
    # would have run too, had it not been cancelled.
    later = executor.submit(h.square, 6)
    for g in gates:
        g.release()
    assert later.result(timeout=30) == 36
    executor.shutdown(wait=True)
    assert not marker.exists()


def test_done_callbacks_fire_exactly_once(executor, make_gate):
    gate = make_gate()
    calls = []
    lock = threading.Lock()

    def callback(name):
        def cb(f):
            with lock:
                calls.append((name, f))
        return cb

    future = gate.submit(executor, "v")
    future.add_done_callback(callback("before"))
    gate.release()
    assert future.result(timeout=30) == "v"
    future.add_done_callback(callback("after"))
    # Give a wrongly repeated callback a chance to show up.
    executor.submit(h.square, 1).result(timeout=30)
    wait_until(lambda: len(calls) >= 2, 5, "both callbacks")
    assert sorted(name for name, _ in calls) == ["after", "before"]
    assert all(f is future for _, f in calls)


def test_done_callback_fires_once_for_a_cancelled_future(executor, make_gate, tmp_path):
    gates = occupy_workers(executor, make_gate)
    calls = []
    future = executor.submit(h.record, str(tmp_path / "ran"))
    future.add_done_callback(calls.append)
    assert future.cancel()
    for g in gates:
        g.release()
    executor.shutdown(wait=True)
    assert calls == [future]


# -- wait and as_completed ---------------------------------------------------


def test_wait_first_completed_returns_when_one_future_is_done(executor, make_gate):
    gate = make_gate()
    slow = gate.submit(executor)
    quick = executor.submit(h.square, 2)
    done, not_done = futures.wait([slow, quick], timeout=30, return_when=futures.FIRST_COMPLETED)
    assert done == {quick}
    assert not_done == {slow}
    gate.release()


def test_wait_first_exception_returns_at_the_first_failure(executor, make_gate):
    gate = make_gate()
    slow = gate.submit(executor)
    ok = executor.submit(h.square, 2)
    ok.result(timeout=30)
    bad = executor.submit(h.raise_contract_error, "x")
    done, not_done = futures.wait([slow, ok, bad], timeout=30, return_when=futures.FIRST_EXCEPTION)
    assert done == {ok, bad}
    assert not_done == {slow}
    gate.release()


def test_wait_all_completed_waits_for_all_or_the_timeout(executor, make_gate):
    gate = make_gate()
    slow = gate.submit(executor)
    quick = [executor.submit(h.square, i) for i in range(4)]
    done, not_done = futures.wait([slow, *quick], timeout=0.5, return_when=futures.ALL_COMPLETED)
    assert done == set(quick) and not_done == {slow}
    gate.release()
    done, not_done = futures.wait([slow, *quick], timeout=30)
    assert done == {slow, *quick} and not not_done


def test_as_completed_yields_futures_as_they_finish(executor, make_gate):
    gate = make_gate()
    slow = gate.submit(executor, "slow")
    quick = executor.submit(h.square, 3)
    it = futures.as_completed([slow, quick], timeout=30)
    assert next(it) is quick
    gate.release()
    assert next(it) is slow
    assert slow.result() == "slow"


def test_as_completed_raises_timeout_error_for_unfinished_futures(executor, make_gate):
    gate = make_gate()
    slow = gate.submit(executor)
    quick = executor.submit(h.square, 3)
    seen = []
    began = time.monotonic()
    with pytest.raises(futures.TimeoutError):
        for f in futures.as_completed([slow, quick], timeout=1.0):
            seen.append(f)
    assert seen == [quick]
    assert time.monotonic() - began < 10
    gate.release()


def test_wait_and_as_completed_mix_futures_from_another_executor(executor, make_gate):
    gate = make_gate()
    release_thread = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as threads:
        t_future = threads.submit(release_thread.wait, 30)
        mine = executor.submit(h.square, 9)
        blocked = gate.submit(executor, "gated")
        done, not_done = futures.wait([t_future, mine, blocked], timeout=30,
                                      return_when=futures.FIRST_COMPLETED)
        assert done == {mine} and not_done == {t_future, blocked}
        release_thread.set()
        it = futures.as_completed([t_future, blocked], timeout=30)
        assert next(it) is t_future
        gate.release()
        assert next(it) is blocked
    assert (mine.result(), t_future.result(), blocked.result()) == (81, True, "gated")


# -- multiprocessing.Manager proxies as arguments ----------------------------
#
# A proxy authenticates to its manager with the multiprocessing key of the
# process that unpickles it. ProcessPoolExecutor's workers inherit the
# caller's key; ours are given it by the launcher that starts them (the
# session cluster's workers too, as its executor runs in this process).


@pytest.fixture
def manager():
    # Its server is forked from a forkserver, not from this process, which
    # has threads (the Dask clients').
    with multiprocessing.get_context("forkserver").Manager() as m:
        yield m


def drain(queue, count: int) -> list:
    return [queue.get(timeout=30) for _ in range(count)]


def test_a_manager_queue_passed_to_calls_carries_their_progress(executor, manager):
    progress = manager.Queue()
    assert list(executor.map(h.report_progress, itertools.repeat(progress), range(20))) == \
        [i * i for i in range(20)]
    assert executor.submit(h.report_progress, progress, 20).result(timeout=30) == 400
    assert sorted(drain(progress, 21)) == list(range(21))
    assert progress.empty()


def test_a_manager_dict_passed_to_calls_holds_what_they_wrote(executor, manager):
    written = manager.dict()
    pids = [f.result(timeout=30) for f in [executor.submit(h.store_pid, written, i) for i in range(10)]]
    assert dict(written) == dict(enumerate(pids))


def test_a_call_waits_for_a_manager_event_that_the_caller_sets(executor, manager):
    event, waiting = manager.Event(), manager.Queue()
    future = executor.submit(h.wait_for_event, event, waiting)
    wait_until(lambda: future.done() or not waiting.empty(), 30, "the call to wait for the event")
    assert not future.done(), future.exception()
    event.set()
    assert future.result(timeout=30) is True


@pytest.mark.parametrize("executor_type", ["ProcessPoolExecutor", "SulisDaskExecutor"])
def test_manager_proxies_work_in_spawned_workers(executor_type, manager):
    if executor_type == "ProcessPoolExecutor":
        ex = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
    else:
        ex = SulisDaskExecutor(2, mp_context="spawn")
    progress = manager.Queue()
    with ex:
        assert list(ex.map(h.report_progress, itertools.repeat(progress), range(10))) == \
            [i * i for i in range(10)]
    assert sorted(drain(progress, 10)) == list(range(10))


@pytest.mark.parametrize("executor_type", ["ProcessPoolExecutor", "SulisDaskExecutor"])
def test_manager_proxies_work_in_workers_that_max_tasks_per_child_replaced(executor_type, manager):
    written = manager.dict()
    with with_max_tasks_per_child(executor_type, 1, 1) as ex:
        pids = [ex.submit(h.store_pid, written, i).result(timeout=30) for i in range(3)]
    assert len(set(pids)) == 3, "every call ran in a fresh worker process"
    assert dict(written) == dict(enumerate(pids))


@pytest.mark.parametrize("mp_context", [None, "spawn"])
def test_manager_proxies_work_in_a_worker_that_replaced_a_killed_one(mp_context, manager):
    import signal

    written = manager.dict()
    with SulisDaskExecutor(1, mp_context=mp_context) as ex:
        first = ex.submit(h.store_pid, written, "first").result(timeout=30)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: set(ex.client.run(os.getpid, on_error="ignore").values()) - {first},
                   30, "a worker to replace the killed one")
        second = ex.submit(h.store_pid, written, "second").result(timeout=30)
    assert second != first
    assert dict(written) == {"first": first, "second": second}


# -- objects that fail to pickle or unpickle -----------------------------------


def notes(error: BaseException) -> str:
    """The PEP 678 notes of an exception, as one string."""
    return "\n".join(getattr(error, "__notes__", []))


def report(error: BaseException) -> str:
    """What the default traceback printout shows, causes included."""
    return "".join(traceback.format_exception(error))


def test_an_argument_whose_pickling_raises_fails_its_call_with_that_error(executor):
    future = executor.submit(h.identity, h.DividesByZeroWhenPickled())
    exc = future.exception(timeout=30)
    assert type(exc) is ZeroDivisionError
    if is_sulis(executor):
        assert ("positional argument 0 of identity(), of type "
                "tests.contract_helpers.DividesByZeroWhenPickled, cannot be pickled") in notes(exc)
    assert executor.submit(h.square, 3).result(timeout=30) == 9


def test_a_map_item_whose_pickling_raises_fails_the_map_with_that_error(executor):
    results = executor.map(h.identity, [0, 1, h.DividesByZeroWhenPickled(), 3], chunksize=2)
    assert [next(results), next(results)] == [0, 1]
    with pytest.raises(ZeroDivisionError) as info:
        next(results)
    if is_sulis(executor):
        assert "argument 0 of item 2 given to map(identity)" in notes(info.value)


def test_a_result_whose_pickling_raises_fails_its_call_with_that_error(executor):
    exc = executor.submit(h.make_unpicklable, "ZeroDivisionError").exception(timeout=30)
    assert type(exc) is ZeroDivisionError
    if is_sulis(executor):
        assert ("the result, of type tests.contract_helpers.DividesByZeroWhenPickled, could not "
                "be pickled") in notes(exc)
    assert executor.submit(h.square, 3).result(timeout=30) == 9


# A result that refuses to unpickle: how, and how large (pushed results are
# at most 1 MB; larger ones are fetched).
REFUSALS = [("ValueError", 0), ("SystemExit", 0), ("KeyboardInterrupt", 0),
            ("ValueError", 2 * MB), ("SystemExit", 2 * MB)]


@pytest.mark.parametrize("how, padding", REFUSALS)
def test_a_result_that_cannot_be_unpickled_fails_its_call_as_a_broken_pool_with_the_cause(
        executor, capfd, how, padding):
    # ProcessPoolExecutor breaks the whole pool then; we fail that call only.
    future = executor.submit(h.make_refusing, how, padding)
    exc = future.exception(timeout=30)
    assert isinstance(exc, BrokenProcessPool)
    assert f"{how}: refused to unpickle, on purpose" in report(exc)
    if is_sulis(executor):
        assert isinstance(exc, UnpicklingFailedError) and not isinstance(exc, BrokenSulisExecutor)
        assert "the result of make_refusing() could not be unpickled here" in str(exc)
        assert type(exc.__cause__).__name__ == how
        assert executor.submit(h.square, 3).result(timeout=30) == 9
    assert "Traceback" not in capfd.readouterr().err


def test_a_map_raises_at_the_chunk_whose_results_cannot_be_unpickled(executor, capfd):
    # Short chunks of 3 travel to the cluster several to a task; only the
    # chunk with item 700 fails (with ProcessPoolExecutor, the whole pool).
    results = []
    with pytest.raises(BrokenProcessPool) as info:
        for r in executor.map(h.refusing_if, range(900), itertools.repeat(700), chunksize=3):
            results.append(r)
    assert results == list(range(len(results)))
    assert "ValueError: refused to unpickle, on purpose" in report(info.value)
    if is_sulis(executor):
        assert results == list(range(699))
        assert isinstance(info.value, UnpicklingFailedError)
        assert "the results of items 699-701 of map(refusing_if)" in str(info.value)
        assert list(executor.map(h.square, range(10), chunksize=3)) == [i * i for i in range(10)]
    assert "Traceback" not in capfd.readouterr().err


# -- Sulis only: unpickling errors fail only the calls concerned -------------


@pytest.fixture(params=["attached", "local"])
def sulis_executor(request, scheduler_address):
    """Ours attached to the session's cluster (batches go as Dask tasks, and
    their results are fetched) and with a cluster of its own (batches go to
    its nodes' pools, and their results come back on the agents' streams)."""
    if request.param == "local":
        ex = SulisDaskExecutor(max_workers=2)
    else:
        ex = request.getfixturevalue("shared_executor")
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


def warm_up(ex) -> None:
    """Run a few calls first, so that the executor has timed them and sends
    the next ones in batches of many."""
    assert sum(ex.submit(h.square, i).result(timeout=30) for i in range(20)) == 2470


def test_a_result_that_cannot_be_unpickled_fails_alone_among_its_batch_mates(
        sulis_executor, capfd, tmp_path, request):
    ex = sulis_executor
    warm_up(ex)
    key_file = tmp_path / "bad.key"
    futures_ = [ex.submit(h.task_key_or_refusing, i, 500, str(key_file)) for i in range(1000)]
    bad = futures_.pop(500)
    error = bad.exception(timeout=30)
    assert isinstance(error, UnpicklingFailedError)
    assert isinstance(error.__cause__, ValueError)
    good = [f.result(timeout=30) for f in futures_]
    assert [i for i, _ in good] == [i for i in range(1000) if i != 500]
    # Each batch's calls see its key (its Dask task's, or the batch's in a
    # pool): the bad result shared its batch, and the payload of results,
    # with good ones.
    assert key_file.read_text() in {key for _, key in good}
    assert ex.submit(h.square, 3).result(timeout=30) == 9
    assert "Traceback" not in capfd.readouterr().err


def test_a_result_whose_pickling_raises_system_exit_fails_its_call_with_unpicklable_error(
        sulis_executor, capfd):
    # ProcessPoolExecutor sends the SystemExit back, and result() raises it.
    ex = sulis_executor
    exc = ex.submit(h.make_unpicklable, "SystemExit").exception(timeout=30)
    assert isinstance(exc, UnpicklableError)
    assert "the result, of type tests.contract_helpers.ExitsWhenPickled, could not be pickled" in str(exc)
    assert "SystemExit: refused to pickle, on purpose" in str(exc)
    assert ex.submit(h.square, 3).result(timeout=30) == 9
    assert "Traceback" not in capfd.readouterr().err


# A call whose argument refuses to unpickle on the worker: how, and how
# large (a payload of 1 MB or more is shared rather than sent with the task).
CALL_REFUSALS = [("ValueError", 0), ("SystemExit", 0), ("KeyboardInterrupt", 0), ("ValueError", 2 * MB)]


@pytest.mark.parametrize("how, padding", CALL_REFUSALS)
def test_a_call_that_cannot_be_unpickled_on_its_worker_fails_as_a_broken_pool_with_the_cause(
        sulis_executor, capfd, how, padding):
    # ProcessPoolExecutor's worker dies of it (a SystemExit ends it), so the
    # pool breaks, with no cause; here the call fails with its cause.
    ex = sulis_executor
    future = ex.submit(h.identity, h.RefusesToUnpickle(how, padding))
    exc = future.exception(timeout=30)
    assert isinstance(exc, UnpicklingFailedError) and not isinstance(exc, BrokenSulisExecutor)
    assert "the call to identity() could not be unpickled on its worker" in str(exc)
    assert type(exc.__cause__).__name__ == how
    assert f"{how}: refused to unpickle, on purpose" in report(exc)
    assert "in refuse_to_rebuild" in report(exc)  # where, on the worker
    assert ex.submit(h.square, 3).result(timeout=30) == 9
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("how", ["ValueError", "SystemExit"])
def test_a_call_that_cannot_be_unpickled_fails_alone_among_its_batch_mates(sulis_executor, capfd, how):
    ex = sulis_executor
    warm_up(ex)
    calls = [ex.submit(h.square, i) for i in range(300)]
    bad = ex.submit(h.identity, h.RefusesToUnpickle(how))
    calls += [ex.submit(h.square, i) for i in range(300, 600)]
    assert isinstance(bad.exception(timeout=30), UnpicklingFailedError)
    assert [f.result(timeout=30) for f in calls] == [i * i for i in range(600)]
    assert ex.submit(h.square, 3).result(timeout=30) == 9
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("how", ["ValueError", "SystemExit"])
def test_a_map_raises_at_the_chunk_that_cannot_be_unpickled_on_its_worker(sulis_executor, capfd, how):
    ex = sulis_executor
    items = [h.RefusesToUnpickle(how) if i == 700 else i for i in range(900)]
    results = []
    with pytest.raises(UnpicklingFailedError, match=r"items 699-701 given to map\(identity\)") as info:
        for r in ex.map(h.identity, items, chunksize=3):
            results.append(r)
    assert results == list(range(699))
    assert type(info.value.__cause__).__name__ == how
    assert list(ex.map(h.square, range(10), chunksize=3)) == [i * i for i in range(10)]
    assert "Traceback" not in capfd.readouterr().err


# -- Sulis only: map(buffersize=) (Python 3.14) ------------------------------


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError), ("2", TypeError)])
def test_map_buffersize_must_be_a_positive_integer(buffered_executor, bad, error):
    executor = buffered_executor
    with pytest.raises(error):
        executor.map(h.square, range(3), buffersize=bad)


def test_map_buffersize_consumes_an_infinite_iterator_lazily(buffered_executor):
    executor = buffered_executor
    results = executor.map(h.square, itertools.count(), buffersize=2)
    assert list(itertools.islice(results, 10)) == [i * i for i in range(10)]
    results.close()


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_buffersize_keeps_at_most_buffersize_chunks_in_flight(buffered_executor, chunksize):
    executor = buffered_executor
    buffersize = 2
    consumed = []

    def source():
        for i in itertools.count():
            consumed.append(i)
            yield i

    results = executor.map(h.square, source(), buffersize=buffersize, chunksize=chunksize)
    assert len(consumed) == buffersize * chunksize
    for k in range(1, 3 * chunksize + 1):
        assert next(results) == (k - 1) ** 2
        # One chunk more each time a chunk's results are first reached.
        chunks_taken = -(-k // chunksize)
        assert len(consumed) <= (buffersize + chunks_taken) * chunksize
    results.close()


def test_map_buffersize_results_match_plain_map(buffered_executor):
    executor = buffered_executor
    got = list(executor.map(h.add3, range(50), range(50), range(40), buffersize=3, chunksize=4))
    assert got == [3 * i for i in range(40)]


def test_closing_a_buffered_map_of_an_infinite_iterator_lets_shutdown_finish(buffered_executor):
    executor = buffered_executor
    results = executor.map(h.sleep_then_return, itertools.repeat(0.05), itertools.count(), buffersize=2)
    assert next(results) == 0
    results.close()
    began = time.monotonic()
    executor.shutdown(wait=True)
    assert time.monotonic() - began < 10


# -- Sulis only: the cluster side --------------------------------------------


def scheduler_task_count(ex) -> int:
    return ex.client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))


def test_an_exception_leaving_the_with_block_does_not_finish_a_map(tmp_path):
    # ProcessPoolExecutor submits a map's every call at once, and
    # waits for them all. Here the code after the block, which could read the
    # rest, does not run; what was submitted runs.
    paths = [str(tmp_path / f"call{i}") for i in range(2000)]
    with pytest.raises(RuntimeError, match="stop"):
        with SulisDaskExecutor(max_workers=2) as ex:
            results = ex.map(h.record, paths)
            next(results)
            raise RuntimeError("stop")
    ran = sum(os.path.exists(p) for p in paths)
    assert 1 <= ran < 2000


def test_cluster_forgets_tasks_once_their_futures_are_settled(shared_executor, make_gate, gate_dir):
    ex = shared_executor
    wait_until(lambda: scheduler_task_count(ex) == 0, 10, "an idle scheduler")
    data = os.urandom(20 * MB)
    big = ex.submit(h.nbytes, data)
    del data
    results = [ex.submit(h.make_dummy) for _ in range(10)]
    assert list(ex.map(h.square, range(50), chunksize=5)) == [i * i for i in range(50)]
    failed = ex.submit(h.raise_contract_error, "x")
    gates = occupy_workers(ex, make_gate)
    cancelled = [ex.submit(h.square, i) for i in range(5)]
    assert all(f.cancel() for f in cancelled)
    for g in gates:
        g.release()
    assert big.result(timeout=30) == 20 * MB
    futures.wait([*results, failed], timeout=30)
    assert failed.exception() is not None
    wait_until(lambda: scheduler_task_count(ex) == 0, 15, "the scheduler to release every task")
    del results, big, failed


def listening(address: str) -> bool:
    """Whether something accepts connections at a Dask ``address``
    (``tls://host:port``, ``tcp://[::1]:port``): ``False`` only when the
    connection is refused; any other error (an unknown host) fails."""
    from distributed.comm import get_address_host_port

    host, port = get_address_host_port(address)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return False
    return True


def test_an_executor_with_its_own_cluster_stops_it_on_shutdown():
    with SulisDaskExecutor(max_workers=2) as ex:
        assert list(ex.map(h.square, range(10))) == [i * i for i in range(10)]
        address = ex.client.scheduler.address
        assert listening(address), f"the check sees the scheduler listening at {address}"
    assert ex.client.status == "closed"
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(h.square, 1)
    wait_until(lambda: not listening(address), 10, f"the scheduler at {address} to stop listening")


# -- max_tasks_per_child -----------------------------------------------------


def with_max_tasks_per_child(executor_type: str, max_workers: int, max_tasks: int):
    if executor_type == "ProcessPoolExecutor":
        # It needs a start method other than fork, and picks spawn by itself.
        return ProcessPoolExecutor(max_workers, max_tasks_per_child=max_tasks)
    return SulisDaskExecutor(max_workers, max_tasks_per_child=max_tasks)


@pytest.mark.parametrize("executor_type", ["ProcessPoolExecutor", "SulisDaskExecutor"])
def test_max_tasks_per_child_replaces_the_worker_process_after_that_many_tasks(executor_type):
    # CPython's own test of the option, step by step.
    with with_max_tasks_per_child(executor_type, 1, 3) as ex:
        original = ex.submit(os.getpid).result(timeout=30)
        assert ex.submit(os.getpid).result(timeout=30) == original
        assert ex.submit(os.getpid).result(timeout=30) == original
        assert ex.submit(os.getpid).result(timeout=30) != original


@pytest.mark.parametrize("executor_type", [ProcessPoolExecutor, SulisDaskExecutor])
@pytest.mark.parametrize("bad, error", [("3", TypeError), (0, ValueError), (-1, ValueError)])
def test_max_tasks_per_child_must_be_a_positive_integer(executor_type, bad, error):
    with pytest.raises(error, match="max_tasks_per_child"):
        executor_type(1, max_tasks_per_child=bad)
