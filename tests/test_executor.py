"""What SulisDaskExecutor promises beyond the shared contract suite.

The contract every ``concurrent.futures`` executor keeps is tested, side by
side with ``ProcessPoolExecutor``, in ``test_contract.py``. This module holds
what is particular to running on Dask: calls are never merged or rewritten,
initializers follow workers across restarts, dead workers surface as
``BrokenProcessPool``, the cluster's memory stays bounded, and a normal run
is silent.
"""

from __future__ import annotations

import concurrent.futures
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import psutil
import pytest

from sulis_executor import (
    BrokenSulisExecutor,
    SulisDaskExecutor,
    UnpicklableError,
    UnpicklingFailedError,
    WorkerDiedError,
)
from tests import executor_tasks as tasks
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parent.parent


def scheduler_task_count(ex: SulisDaskExecutor) -> int:
    return ex.client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))


def worker_pids(ex: SulisDaskExecutor) -> dict[str, int]:
    """The processes that run calls: on a local cluster the executor
    started, its pool's members (not the agent, its Dask worker); on a
    cluster it attached to, Dask's workers."""
    started = getattr(ex._launcher, "worker_pids", None)
    if started is None:
        return ex.client.run(os.getpid, on_error="ignore")
    agents = set(ex.client.run(os.getpid, on_error="ignore").values())
    return {str(pid): pid for pid in started() if pid not in agents}


# -- calls reach the function exactly as made --------------------------------


def test_kwargs_named_like_dask_options_reach_the_function_untouched(shared_executor):
    kwargs = dict(key="k", workers=["w"], pure=True, retries=3, priority=9, resources={"GPU": 1}, fn=1)
    assert shared_executor.submit(tasks.echo_kwargs, **kwargs).result(timeout=30) == kwargs


def test_identical_calls_are_each_run_never_deduplicated(shared_executor, tmp_path):
    path = str(tmp_path / "calls.txt")
    futures = [shared_executor.submit(tasks.append_line, path, "same") for _ in range(8)]
    concurrent.futures.wait(futures, timeout=30)
    assert [f.result() for f in futures] == [None] * 8
    assert Path(path).read_text().splitlines() == ["same"] * 8


def test_submit_of_a_non_callable_raises_type_error_naming_it(shared_executor):
    with pytest.raises(TypeError, match="42"):
        shared_executor.submit(42)
    assert shared_executor.submit(tasks.square, 3).result(timeout=30) == 9


# -- unpicklable objects are named -------------------------------------------


def notes(error: BaseException) -> str:
    """The PEP 678 notes of an exception, as one string."""
    return "\n".join(getattr(error, "__notes__", []))


def test_unpicklable_argument_keeps_its_error_and_a_note_names_the_argument_and_its_type(
        shared_executor):
    future = shared_executor.submit(tasks.square, threading.Lock())
    error = future.exception(timeout=10)
    assert type(error) is TypeError  # as ProcessPoolExecutor raises it
    assert "lock" in str(error)
    assert "positional argument 0 of square(), of type _thread.lock" in notes(error)
    assert shared_executor.submit(tasks.square, 4).result(timeout=30) == 16


def test_unpicklable_result_keeps_its_error_and_a_note_names_its_type(shared_executor):
    future = shared_executor.submit(threading.Lock)
    error = future.exception(timeout=30)
    assert type(error) is TypeError
    assert "the result, of type _thread.lock," in notes(error)


def test_short_chunks_of_an_explicit_chunksize_travel_together_long_ones_alone(shared_executor):
    keys = list(shared_executor.map(tasks.current_task_key, range(3000), chunksize=3))
    chunks = [keys[i:i + 3] for i in range(0, 3000, 3)]
    assert all(len(set(chunk)) == 1 for chunk in chunks)  # a chunk never splits
    assert len(set(keys)) < len(chunks) / 4  # many chunks to a task
    # 50 ms calls one to a chunk: each chunk a task, so none waits behind another.
    keys = list(shared_executor.map(tasks.current_task_key, range(12), [0.05] * 12, chunksize=1))
    assert len(set(keys)) == 12


def test_unpicklable_map_item_names_the_item(shared_executor):
    items = [1, 2, 3, threading.Lock(), 5]
    results = shared_executor.map(tasks.pid_of_worker, items, chunksize=10)
    with pytest.raises(TypeError, match="lock") as info:
        list(results)
    assert "argument 0 of item 3 given to map(pid_of_worker)" in notes(info.value)


class InterruptsWhenPickled:
    """An argument whose pickling raises KeyboardInterrupt, as a buggy or
    hostile ``__reduce__`` could."""

    def __reduce__(self):
        raise KeyboardInterrupt("from __reduce__")


def test_an_argument_interrupting_its_own_pickling_fails_only_its_call(tmp_path):
    release = tmp_path / "release"
    with SulisDaskExecutor(1) as ex:
        # Fill the cluster (two batches per worker thread), so the next
        # calls wait on the client and the results thread pickles them.
        blockers = [ex.submit(tasks.wait_for_file, str(release)) for _ in range(2)]
        wait_until(lambda: all(f.running() for f in blockers), 10, "both calls on the cluster")
        bad = ex.submit(tasks.square, InterruptsWhenPickled())
        good = ex.submit(tasks.square, 5)
        assert not bad.done() and not good.done()
        release.touch()
        error = bad.exception(timeout=30)
        assert isinstance(error, UnpicklableError), error
        assert "positional argument 0 of square()" in str(error)
        assert isinstance(error.__cause__, KeyboardInterrupt)
        assert good.result(timeout=30) == 25
        assert [f.result(timeout=30) for f in blockers] == [str(release)] * 2
        assert ex.submit(tasks.square, 6).result(timeout=30) == 36


def test_ctrl_c_while_pickling_in_the_callers_thread_propagates():
    with SulisDaskExecutor(1) as ex:
        with pytest.raises(KeyboardInterrupt):
            ex.submit(tasks.square, InterruptsWhenPickled())
        assert ex.submit(tasks.square, 7).result(timeout=30) == 49


# -- initializer -------------------------------------------------------------


def test_initializer_runs_once_per_worker_process_before_its_first_task(tmp_path):
    log = tmp_path / "init.txt"
    with SulisDaskExecutor(2, initializer=tasks.record_initializer, initargs=(str(log), "init")) as ex:
        results = [f.result(timeout=30) for f in [ex.submit(tasks.pid_and_initialized) for _ in range(40)]]
        assert all(initialized for _, initialized in results)
        lines = log.read_text().splitlines()
        assert len(lines) == len(set(lines)), "an initializer ran twice in one process"
        assert {pid for pid, _ in results} <= {int(line.split()[1]) for line in lines}


def test_initializer_also_runs_in_a_worker_that_replaced_a_killed_one(tmp_path):
    log = tmp_path / "init.txt"
    with SulisDaskExecutor(1, initializer=tasks.record_initializer, initargs=(str(log), "init")) as ex:
        first_pid, initialized = ex.submit(tasks.pid_and_initialized).result(timeout=30)
        assert initialized
        os.kill(first_pid, signal.SIGKILL)
        wait_until(lambda: set(worker_pids(ex).values()) - {first_pid}, what="a replacement worker")
        new_pid, initialized = ex.submit(tasks.pid_and_initialized).result(timeout=30)
        assert new_pid != first_pid and initialized
        assert sorted(log.read_text().split()[1::2]) == sorted([str(first_pid), str(new_pid)])


def test_initializer_runs_in_each_worker_that_max_tasks_per_child_replaces(tmp_path):
    log = tmp_path / "init.txt"
    with SulisDaskExecutor(1, initializer=tasks.record_initializer, initargs=(str(log), "init"),
                           max_tasks_per_child=1) as ex:
        results = [ex.submit(tasks.pid_and_initialized).result(timeout=30) for _ in range(3)]
    assert len({pid for pid, _ in results}) == 3
    assert all(initialized for _, initialized in results)
    assert sorted(log.read_text().split()[1::2]) == sorted(str(pid) for pid, _ in results)


# -- max_tasks_per_child -----------------------------------------------------


def test_max_tasks_per_child_counts_calls_submitted_together_one_by_one():
    with SulisDaskExecutor(1, max_tasks_per_child=3) as ex:
        pids = [f.result(timeout=30) for f in [ex.submit(os.getpid) for _ in range(10)]]
    assert [pids.count(pid) for pid in dict.fromkeys(pids)] == [3, 3, 3, 1]


def test_max_tasks_per_child_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("SULIS_EXECUTOR_MAX_TASKS_PER_CHILD", "2")
    with SulisDaskExecutor(1) as ex:
        pids = [ex.submit(os.getpid).result(timeout=30) for _ in range(5)]
    assert [pids.count(pid) for pid in dict.fromkeys(pids)] == [2, 2, 1]


def test_max_tasks_per_child_counts_map_chunks_as_tasks():
    with SulisDaskExecutor(2, max_tasks_per_child=2) as ex:
        pids = list(ex.map(tasks.pid_of_worker, range(12), chunksize=1))
        assert max(pids.count(pid) for pid in set(pids)) <= 2
        assert len(set(pids)) >= 6
        chunked = list(ex.map(tasks.pid_of_worker, range(12), chunksize=4))
        assert all(len(set(chunked[i:i + 4])) == 1 for i in range(0, 12, 4))


def test_a_worker_leaving_after_max_tasks_per_child_never_makes_a_call_run_twice(tmp_path):
    # Dask runs a task again when the only copy of its result goes with a
    # worker that leaves; the worker leaves only once the client has it.
    path = str(tmp_path / "calls.txt")
    with SulisDaskExecutor(2, max_tasks_per_child=1) as ex:
        futures = [ex.submit(tasks.append_line, path, str(i)) for i in range(10)]
        assert [f.result(timeout=60) for f in futures] == [None] * 10
        assert list(ex.map(tasks.append_line, [path] * 6, "abcdef", chunksize=1)) == [None] * 6
    assert sorted(Path(path).read_text().split()) == sorted([str(i) for i in range(10)] + list("abcdef"))


def test_max_tasks_per_child_on_workers_it_cannot_replace_fails_at_once_naming_it(scheduler_address):
    started = time.monotonic()
    with pytest.raises(ValueError, match="max_tasks_per_child needs worker processes the executor can replace"):
        SulisDaskExecutor(address=scheduler_address, max_tasks_per_child=5)
    assert time.monotonic() - started < 5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["terminate_workers", "kill_workers"])
def test_workers_the_executor_did_not_start_are_not_its_to_terminate(shared_executor, method):
    with pytest.raises(NotImplementedError,
                       match=rf"{method}\(\).*'address' mode.*shutdown\(wait=False, cancel_futures=True\)"):
        getattr(shared_executor, method)()
    # Nothing changed: the executor and the cluster's workers go on.
    assert shared_executor.submit(tasks.square, 3).result(timeout=30) == 9


def test_failing_initializer_breaks_the_executor_like_process_pool(tmp_path):
    with SulisDaskExecutor(1, initializer=tasks.failing_initializer) as ex:
        error = ex.submit(tasks.square, 2).exception(timeout=30)
        assert isinstance(error, BrokenSulisExecutor)
        assert isinstance(error, concurrent.futures.BrokenExecutor)
        assert "failing_initializer" in str(error) and "initializer failed on purpose" in str(error)
        with pytest.raises(BrokenSulisExecutor):
            ex.submit(tasks.square, 3)
        with pytest.raises(BrokenSulisExecutor):
            ex.map(tasks.square, [1])


# -- dead workers ------------------------------------------------------------


def test_a_call_that_kills_its_worker_fails_alone_with_broken_process_pool():
    with SulisDaskExecutor(2) as ex:
        doomed = ex.submit(tasks.kill_own_process)
        others = [ex.submit(tasks.square, i) for i in range(10)]
        error = doomed.exception(timeout=60)
        assert isinstance(error, WorkerDiedError) and isinstance(error, BrokenProcessPool)
        assert "kill_own_process" in str(error) and "died" in str(error)
        assert [f.result(timeout=30) for f in others] == [i * i for i in range(10)]
        assert ex.submit(tasks.square, 7).result(timeout=30) == 49


def test_a_map_survives_a_worker_killed_in_the_middle():
    with SulisDaskExecutor(2) as ex:
        results = ex.map(tasks.slow_identity, range(150), [0.01] * 150)
        seen = [next(results) for _ in range(20)]
        victim = next(iter(worker_pids(ex).values()))
        os.kill(victim, signal.SIGKILL)
        seen += list(results)
        assert seen == list(range(150))


def test_a_map_call_that_kills_its_worker_every_time_fails_at_its_item_as_a_broken_pool():
    with SulisDaskExecutor(2) as ex:
        results = ex.map(tasks.exit_at, range(6), [3] * 6)
        assert [next(results) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(WorkerDiedError) as info:
            next(results)
        assert isinstance(info.value, BrokenProcessPool)
        assert "exit_at" in str(info.value) and "died" in str(info.value)
        assert list(ex.map(tasks.square, range(5))) == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("cluster", ["attached", "local"])
def test_a_map_item_that_fails_to_unpickle_on_the_worker_raises_at_that_item_with_its_error(
        request, cluster, scheduler_address):
    ex = request.getfixturevalue("shared_executor") if cluster == "attached" else SulisDaskExecutor(2)
    with ex:
        results = ex.map(tasks.square, [1, 2, tasks.UnpicklesOnlyOnTheClient(), 4])
        assert [next(results), next(results)] == [1, 4]
        with pytest.raises(UnpicklingFailedError, match="item 2 given to map.square.") as info:
            next(results)
        assert isinstance(info.value.__cause__, ValueError)
        # Where it failed, on the worker, is part of the report.
        report = "".join(traceback.format_exception(info.value))
        assert "cannot be unpickled here: on purpose" in report
        assert "in refuse_to_unpickle" in report


def _scheduler_heard_of(prefix: str, dask_scheduler=None) -> bool:
    """Run on the scheduler: whether a task whose key starts with ``prefix``
    ever reached it (it keeps every prefix it saw, with its statistics)."""
    return any(str(name).startswith(prefix) for name in dask_scheduler.task_prefixes)


def test_calls_and_map_chunks_go_to_the_nodes_pools_not_as_dask_tasks():
    # On a cluster the executor started, batches go to the node's agent on
    # its stream, and run in the pool's members: processes of their own,
    # not the agent's (the Dask worker's), and no batch is a Dask task.
    with SulisDaskExecutor(2) as ex:
        agent = set(ex.client.run(os.getpid).values())
        mapped = set(ex.map(tasks.pid_after, range(200), [0.002] * 200))
        submitted = {f.result(timeout=30) for f in [ex.submit(tasks.pid_after, i, 0.002) for i in range(40)]}
        assert len(mapped | submitted) == 2 and not (mapped | submitted) & agent
        assert not ex.client.run_on_scheduler(_scheduler_heard_of, "pid_after")
        # The batch's key is the call's task, as a Dask task's would be.
        assert ex.submit(tasks.current_task_key).result(timeout=30).startswith("current_task_key-")


def test_calls_can_send_work_of_their_own_through_dask_worker_client():
    # What the error for an executor passed to its own task suggests. The
    # calls run in the pool's members; what they submit runs in the agent's
    # threads, so a member waiting for it never waits for a member.
    with SulisDaskExecutor(2) as ex:
        futures = [ex.submit(tasks.sum_of_squares_through_worker_client, 10) for _ in range(4)]
        assert [f.result(timeout=60) for f in futures] == [285] * 4
        assert list(ex.map(tasks.sum_of_squares_through_worker_client, [3] * 10)) == [5] * 10


def test_a_call_with_a_large_argument_does_not_wait_for_a_long_map_to_end():
    # On a local cluster the array travels as a file, and the call waits
    # for a member behind at most the map's window, not behind the map.
    import numpy

    with SulisDaskExecutor(2) as ex:
        results = ex.map(tasks.slow_identity, range(3000), [0.005] * 3000)
        seen: list[int] = []
        consumer = threading.Thread(target=seen.extend, args=(results,))
        consumer.start()
        try:
            wait_until(lambda: len(seen) >= 100, what="the map to be under way")
            array = numpy.ones(500_000)  # 4 MB
            assert ex.submit(tasks.array_sum, array).result(timeout=60) == 500_000.0
            assert len(seen) < 3000, "the call waited for the whole map"
        finally:
            consumer.join(120)
        assert seen == list(range(3000))


# -- order ---------------------------------------------------------------------


def test_calls_start_in_the_order_they_were_submitted(shared_executor, tmp_path):
    # The executor sends what the cluster has room for as one graph; Dask
    # would order a graph's tasks its own way unless told. Two workers may
    # swap two neighbours that start at the same moment, nothing more.
    log = tmp_path / "starts"
    futures = [shared_executor.submit(tasks.append_line_then_sleep, str(log), str(i), 0.02)
               for i in range(40)]
    concurrent.futures.wait(futures, timeout=60)
    starts = [int(line) for line in log.read_text().split()]
    assert sorted(starts) == list(range(40))
    assert max(abs(position - index) for position, index in enumerate(starts)) <= 1, starts


def test_map_chunks_start_in_input_order(shared_executor, tmp_path):
    import functools

    log = tmp_path / "starts"
    record = functools.partial(tasks.append_line_then_sleep, str(log), delay=0.02)
    list(shared_executor.map(record, [str(i) for i in range(40)], chunksize=1))
    starts = [int(line) for line in log.read_text().split()]
    assert max(abs(position - index) for position, index in enumerate(starts)) <= 1, starts


# -- memory stays bounded ----------------------------------------------------


def test_delivered_results_are_released_on_the_cluster(shared_executor):
    futures = [shared_executor.submit(tasks.square, i) for i in range(200)]
    assert [f.result(timeout=30) for f in futures] == [i * i for i in range(200)]
    # The futures are still referenced here: their values live on the client.
    wait_until(lambda: scheduler_task_count(shared_executor) == 0, what="the cluster to forget results")


def test_a_long_submit_loop_keeps_the_scheduler_task_count_bounded(shared_executor):
    peak = 0
    for i in range(100_000):
        shared_executor.submit(tasks.square, i)  # future dropped on purpose
        if i % 10_000 == 0:
            peak = max(peak, scheduler_task_count(shared_executor))
    last = shared_executor.submit(tasks.square, 3)
    assert last.result(timeout=60) == 9
    assert peak <= 16, f"the scheduler held {peak} tasks at once"
    wait_until(lambda: scheduler_task_count(shared_executor) == 0, what="the cluster to drain")


# -- how results travel ------------------------------------------------------


def count_fetches(ex: SulisDaskExecutor, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record each time ``ex`` fetches finished tasks' results from the cluster."""
    fetches: list[int] = []
    transport = ex._engine._tasks
    fetch = transport._fetch

    def counting_fetch(pairs):
        fetches.append(len(pairs))
        return fetch(pairs)

    monkeypatch.setattr(transport, "_fetch", counting_fetch)
    return fetches


def test_a_tasks_result_is_fetched_once(shared_executor, monkeypatch):
    fetches = count_fetches(shared_executor, monkeypatch)
    assert shared_executor.submit(bytes, 3_000_000).result(timeout=30) == bytes(3_000_000)
    assert fetches == [1]


@pytest.mark.timeout(120)
def test_a_result_that_takes_long_to_fetch_is_waited_for_not_fetched_again(shared_executor, monkeypatch):
    # 200 MB, a task's result, fetched; its worker stops for 12 s in the
    # middle of sending it. The fetch waits: one fetch, no thread left over
    # per attempt, the result whole.
    fetches = count_fetches(shared_executor, monkeypatch)
    ours_before = {t.ident for t in threading.enumerate() if t.name.startswith("sulis-executor")}
    peak = [0]

    def count_ours() -> bool:
        ours = [t for t in threading.enumerate()
                if t.name.startswith("sulis-executor") and t.ident not in ours_before]
        peak[0] = max(peak[0], len(ours))
        return future.done()

    future = shared_executor.submit(tasks.result_sent_slowly, 200_000_000, 12.0)
    wait_until(count_ours, 90, "the slow result")
    assert future.result() == b"\x01" * 200_000_000
    assert fetches == [1]
    assert peak[0] == 0, f"{peak[0]} threads were started to wait for the fetch"


def test_workers_run_no_profiler_unless_the_dashboard_is_on():
    def profiling(dask_worker):
        return "profile" in dask_worker.periodic_callbacks

    with SulisDaskExecutor(1) as ex:
        assert set(ex.client.run(profiling).values()) == {False}
    with SulisDaskExecutor(1, dashboard=True) as ex:
        assert set(ex.client.run(profiling).values()) == {True}


# -- introspection and the joblib route --------------------------------------


def test_introspection_exposes_client_worker_count_and_no_dashboard_by_default(shared_executor):
    from distributed import Client

    assert isinstance(shared_executor.client, Client)
    assert shared_executor.num_workers == 2
    assert shared_executor.dashboard_link is None


def test_dashboard_when_asked_for_binds_localhost():
    with SulisDaskExecutor(1, dashboard=True) as ex:
        link = ex.dashboard_link
        assert link is not None and link.startswith("http://127.0.0.1:")


def test_joblib_dask_backend_runs_on_the_executors_cluster(shared_executor):
    import joblib
    worker_pid_set = set(worker_pids(shared_executor).values())
    with joblib.parallel_config(backend="dask"):
        pids = joblib.Parallel(n_jobs=-1)(joblib.delayed(tasks.pid_of_worker)(i) for i in range(20))
    assert set(pids) <= worker_pid_set
    assert os.getpid() not in pids


# -- lifecycle ---------------------------------------------------------------


def test_a_garbage_collected_executor_stops_its_workers():
    ex = SulisDaskExecutor(2)
    pids = ex._launcher.worker_pids()  # the agent and its members
    assert ex.submit(tasks.square, 2).result(timeout=30) == 4
    del ex
    gc.collect()
    wait_until(lambda: not any(psutil.pid_exists(p) for p in pids), what="workers to exit")


QUIET_SCRIPT = textwrap.dedent(
    """
    from sulis_executor import SulisDaskExecutor
    from tests.executor_tasks import square, raise_value_error

    ex = SulisDaskExecutor(max_workers=2)
    print(sum(ex.map(square, range(100))))
    try:
        ex.submit(raise_value_error, 3).result()
    except ValueError as error:
        print("caught", error)
    {ending}
    """
)


@pytest.mark.parametrize(
    "ending",
    ["ex.shutdown()", "pass  # left open at interpreter exit", "ex.shutdown(wait=False)"],
    ids=["shutdown", "left-open", "shutdown-nowait"],
)
def test_a_normal_run_prints_only_the_users_output(ending):
    script = QUIET_SCRIPT.format(ending=ending)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DASK_"))}
    env["PYTHONPATH"] = str(REPO)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "328350\ncaught bad item 3\n"
    assert proc.stderr == ""
    assert time.monotonic() - started < 30


# -- bad input fails fast and names the culprit ------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize("max_workers", [0, -1])
def test_max_workers_must_be_positive(max_workers):
    with pytest.raises(ValueError, match=f"max_workers must be greater than 0, got {max_workers}"):
        SulisDaskExecutor(max_workers)


@pytest.mark.timeout(10)
def test_unknown_launch_mode_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'bogus'.*local.*srun.*mpi"):
        SulisDaskExecutor(launch="bogus")


@pytest.mark.timeout(10)
def test_unknown_option_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="'max_worker'"):
        SulisDaskExecutor(max_worker=2)


@pytest.mark.timeout(10)
def test_unparseable_memory_limit_names_the_value():
    with pytest.raises(ValueError, match="'lots'"):
        SulisDaskExecutor(memory_limit="lots")


@pytest.mark.timeout(10)
@pytest.mark.parametrize("bad", ["thread", 5])
def test_an_unknown_start_method_fails_at_once_naming_mp_context_and_the_choices(bad):
    with pytest.raises(ValueError, match=f"argument mp_context={bad!r} is invalid.*fork, forkserver, spawn"):
        SulisDaskExecutor(1, bad)


@pytest.mark.timeout(10)
def test_bad_environment_variable_is_named(monkeypatch):
    monkeypatch.setenv("SULIS_EXECUTOR_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="SULIS_EXECUTOR_TIMEOUT='soon'"):
        SulisDaskExecutor()


# -- a lost scheduler ----------------------------------------------------------


@pytest.fixture
def separate_cluster(tmp_path):
    """A cluster started the seed's way: ``dask scheduler`` and ``dask worker``
    processes writing and reading a scheduler file."""
    scheduler_file = tmp_path / "scheduler.json"
    common = ["--no-dashboard", "--host", "127.0.0.1"]
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--port", "0",
         "--scheduler-file", str(scheduler_file), *common],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(scheduler_file),
         "--nthreads", "1", *common],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    yield scheduler, scheduler_file
    for proc in (worker, scheduler):
        proc.kill()
        proc.wait(10)


def test_losing_the_scheduler_fails_pending_futures_promptly_and_breaks_the_executor(separate_cluster):
    scheduler, scheduler_file = separate_cluster
    ex = SulisDaskExecutor(scheduler_file=str(scheduler_file), wait_for_workers=1, timeout=30)
    futures = [ex.submit(tasks.slow_identity, i, 2.0) for i in range(6)]
    wait_until(lambda: futures[0].running(), what="the first call to start")
    scheduler.kill()
    lost_at = time.monotonic()
    done, not_done = concurrent.futures.wait(futures, timeout=10)
    assert not not_done, "futures still pending 10 s after the scheduler died"
    for future in futures:
        error = future.exception()
        assert isinstance(error, BrokenSulisExecutor) and isinstance(error, concurrent.futures.BrokenExecutor)
        assert "scheduler" in str(error)
    assert time.monotonic() - lost_at < 10
    with pytest.raises(BrokenSulisExecutor):
        ex.submit(tasks.square, 2)
    started = time.monotonic()
    ex.shutdown()
    assert time.monotonic() - started < 30


# -- large arguments travel once --------------------------------------------


# Dask keeps one copy of a key per worker, so an array held under a single
# key while every call runs has travelled at most once to each worker; one
# pickled into every batch (or scattered per call) would show up under a new
# key each time.


def test_a_large_array_given_to_many_submits_is_held_once_under_one_key(shared_executor):
    import numpy

    array = numpy.random.rand(500_000)  # 4 MB
    futures = [shared_executor.submit(tasks.large_inputs_held, array, i) for i in range(40)]
    held = {f.result(timeout=60) for f in futures}
    assert len(held) == 1 and len(next(iter(held))) == 1, f"large data held while calls ran: {held}"


def test_a_large_array_bound_with_partial_is_held_once_for_a_whole_map(shared_executor):
    import functools

    import numpy

    array = numpy.random.rand(500_000)
    held = set(shared_executor.map(functools.partial(tasks.large_inputs_held, array), range(40), chunksize=1))
    assert len(held) == 1 and len(next(iter(held))) == 1, f"large data held while calls ran: {held}"


def test_each_call_gets_its_own_copy_of_a_shared_array(shared_executor):
    import numpy

    array = numpy.ones(500_000)
    futures = [shared_executor.submit(tasks.change_in_place_and_sum, array, i) for i in range(20)]
    # Each call doubled a fresh copy, as with ProcessPoolExecutor: none saw another's change.
    assert [f.result(timeout=60) for f in futures] == [1_000_000.0] * 20
    assert array.sum() == 500_000.0


# On a local cluster, large buffers travel as files in a private directory
# in /dev/shm instead (see _shared): written once, removed when done.


def _shared_files(executor) -> list[Path]:
    directory = Path(executor._launcher._shared.path)
    assert directory.stat().st_mode & 0o077 == 0, "the shared directory is open to other users"
    # (It also holds the node's pool's socket: see sulis_executor._pool.)
    return sorted(directory.glob("sulis-shared-*"))


def test_local_cluster_sends_a_large_array_once_as_a_private_file_then_removes_it(host_executor, tmp_path):
    import numpy

    array = numpy.random.rand(500_000)
    release = tmp_path / "release"
    futures = [host_executor.submit(tasks.sum_when_released, array, str(release)) for _ in range(6)]
    wait_until(lambda: any(f.running() for f in futures), what="the calls to start")
    files = _shared_files(host_executor)
    assert [f.stat().st_size for f in files] == [array.nbytes]
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    release.touch()
    assert [f.result(timeout=60) for f in futures] == [float(array.sum())] * 6
    wait_until(lambda: not _shared_files(host_executor), what="the shared file to be removed")


def test_local_cluster_sends_a_large_bytes_argument_as_a_private_file_too(host_executor, tmp_path):
    data = os.urandom(3_000_000)  # bytes stay in the pickle: the whole batch is shared
    release = tmp_path / "release"
    future = host_executor.submit(tasks.size_when_released, data, str(release))
    wait_until(lambda: _shared_files(host_executor), what="the batch to be shared")
    files = _shared_files(host_executor)
    assert len(files) == 1 and files[0].stat().st_size > len(data)
    release.touch()
    assert future.result(timeout=60) == len(data)
    wait_until(lambda: not _shared_files(host_executor), what="the shared file to be removed")


@pytest.mark.timeout(60)
def test_map_chunks_withdrawn_unstarted_let_go_of_their_shared_files(tmp_path):
    # Each item is large (its chunk is shared as a whole, through a file),
    # and every item but the first waits for the release file: two chunks
    # run, the next wait for a member when the iterator is closed, and are
    # withdrawn.
    release = tmp_path / "release"
    with SulisDaskExecutor(2) as ex:
        results = ex.map(tasks.size_when_released, [bytes(1_500_000)] * 20, [os.devnull] + [str(release)] * 19)
        assert next(results) == 1_500_000
        wait_until(lambda: len(ex._engine._agents._dispatch._ready) > 0, what="chunks waiting for a member")
        results.close()
        release.touch()
        wait_until(lambda: not _shared_files(ex), what="the withdrawn chunks' files to be removed")


@pytest.mark.timeout(60)
def test_a_local_cluster_that_cannot_share_through_files_shares_through_dask(tmp_path):
    # As when /dev/shm is full: writing the file fails, so the buffer is
    # scattered through Dask, which a runner cannot read: the batch goes as
    # a task, while runners take the rest.
    import shutil

    from tests import load_workload

    with SulisDaskExecutor(2) as ex:
        shutil.rmtree(ex._launcher._shared.path)
        array = load_workload.array_of(1_500_000)
        assert ex.submit(load_workload.size_of, bytes(1_500_000)).result(timeout=30) == 1_500_000
        assert ex.submit(load_workload.size_of, array).result(timeout=30) == 1_500_000
        assert list(ex.map(load_workload.size_of, [bytes(1_500_000), array] * 3)) == [1_500_000] * 6
        assert list(ex.map(abs, range(-50, 0))) == list(range(50, 0, -1))


def test_a_large_bytes_argument_arrives_whole_through_dask(shared_executor):
    data = os.urandom(3_000_000)
    futures = [shared_executor.submit(tasks.size_when_released, data, os.devnull) for _ in range(5)]
    assert [f.result(timeout=60) for f in futures] == [len(data)] * 5


def test_local_cluster_calls_get_their_own_copy_of_a_shared_array(host_executor):
    import numpy

    array = numpy.ones(500_000)
    futures = [host_executor.submit(tasks.change_in_place_and_sum, array, i) for i in range(10)]
    assert [f.result(timeout=60) for f in futures] == [1_000_000.0] * 10
    assert array.sum() == 500_000.0


def test_a_large_array_sum_comes_back_right_from_many_submits(shared_executor):
    import numpy

    array = numpy.ones(500_000)
    futures = [shared_executor.submit(tasks.array_sum, array, i) for i in range(20)]
    assert [f.result(timeout=60) for f in futures] == [500_000.0 + i for i in range(20)]


def test_an_array_changed_in_place_between_submits_is_sent_again(shared_executor):
    import numpy
    array = numpy.ones(500_000)
    first = shared_executor.submit(tasks.array_sum, array).result(timeout=60)
    array *= 2
    second = shared_executor.submit(tasks.array_sum, array).result(timeout=60)
    assert (first, second) == (500_000.0, 1_000_000.0)


def test_map_with_progress_shows_a_bar_and_keeps_results_in_order(shared_executor, capsys):
    results = list(shared_executor.map(tasks.square, range(50), progress=True))
    assert results == [i * i for i in range(50)]
    assert "50/50" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_an_unreachable_address_fails_after_the_timeout_naming_it():
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=address):
        SulisDaskExecutor(address=address, timeout=3)
    assert time.monotonic() - started < 20


@pytest.mark.timeout(30)
def test_a_tls_scheduler_without_credentials_is_a_clear_error(scheduler_address):
    with pytest.raises(ValueError, match="requires TLS"):
        SulisDaskExecutor(address=scheduler_address, timeout=5)


def test_using_the_executor_inside_its_own_task_fails_clearly_and_it_keeps_working(shared_executor):
    future = shared_executor.submit(tasks.submit_from_inside, shared_executor, 3)
    error = future.exception(timeout=30)
    assert isinstance(error, UnpicklableError)
    assert "SulisDaskExecutor" in str(error) and "worker_client" in str(error)
    assert shared_executor.submit(tasks.square, 3).result(timeout=30) == 9


def test_logs_at_info_the_mode_its_reason_and_the_workers_ready(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="sulis_executor"):
        with SulisDaskExecutor(1):
            pass
    messages = [r.getMessage() for r in caplog.records if r.name == "sulis_executor"]
    assert any("launch mode 'local'" in m and "no SLURM allocation" in m for m in messages), messages
    assert any("1 workers" in m and " s" in m for m in messages), messages


def test_is_silent_by_default(capfd):
    with SulisDaskExecutor(1) as ex:
        assert ex.submit(tasks.square, 2).result(timeout=30) == 4
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


@pytest.mark.timeout(20)
def test_unknown_interface_lists_the_available_ones_and_starts_nothing():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ValueError, match="'ib7-nonexistent'.*lo"):
        SulisDaskExecutor(interface="ib7-nonexistent")
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before


@pytest.mark.timeout(20)
def test_a_scheduler_file_that_never_appears_fails_after_the_timeout_naming_it(tmp_path):
    path = tmp_path / "never-written.json"
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=str(path)):
        SulisDaskExecutor(scheduler_file=str(path), timeout=1)
    assert time.monotonic() - started < 10


# -- size thresholds and load ---------------------------------------------------
# A batch's form depends on its size and on what it was grouped with (calls
# pickled inline, shared as a whole, with shared buffers; a runner or a task
# takes it). tests/slurm/test_load_slurm.py runs the same on srun and MPI
# clusters, where shared buffers are Dask data.


@pytest.mark.timeout(300)
@pytest.mark.parametrize("cluster", ["attached", "local", "local, one call per task"])
def test_every_call_runs_whatever_its_size_and_whatever_it_is_batched_with(cluster, request, scheduler_address):
    import random

    from tests import load_workload

    if cluster == "attached":
        ex = request.getfixturevalue("shared_executor")
    else:  # max_tasks_per_child sends each call as a task of its own
        ex = SulisDaskExecutor(2, max_tasks_per_child=None if cluster == "local" else 10_000)
    try:
        failures = load_workload.Failures()
        rng = random.Random(7)
        for _ in range(2 if cluster != "local, one call per task" else 0):
            # A burst, then another that finds the runners and buffers of the first.
            load_workload.burst(ex, failures, rng, incs=5000, blobs=1000)
        load_workload.boundaries(ex, failures)
        load_workload.large_argument_during_a_long_map(ex, failures)
    finally:
        ex.shutdown()
    assert {name: n for name, n in failures.counts.items() if n} == {}, failures.first


def _shared_bytes(ex) -> int:
    """Bytes of shared buffers the cluster holds for ``ex`` now: files in
    its private directory on a local cluster, Dask data on the others."""
    shared = getattr(ex._launcher, "_shared", None)
    if shared is None:
        return ex.client.run_on_scheduler(tasks.shared_bytes_on_scheduler)
    total = 0
    for file in Path(shared.path).glob("sulis-shared-*"):
        try:
            total += file.stat().st_size
        except FileNotFoundError:  # released since
            pass
    return total


def _shared_bytes_while(ex, work) -> list[int]:
    """Sample ``_shared_bytes(ex)`` while ``work()`` runs."""
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            samples.append(_shared_bytes(ex))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return samples


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cluster", ["attached", "local"])
def test_steady_work_on_fresh_large_arguments_holds_a_bounded_amount_of_them(cluster, request, monkeypatch,
                                                                            scheduler_address):
    # Each call has an argument of its own above the sharing threshold; the
    # calls keep the collector busy, never idle for long. What the cluster
    # (or /dev/shm) holds for them stays within IDLE_LIMIT plus what the
    # batches in flight use, instead of growing with the calls.
    import numpy

    from sulis_executor import _shared

    size = 2 * _shared.SHARE_THRESHOLD
    idle_limit = 20 * size
    monkeypatch.setattr(_shared, "IDLE_LIMIT", idle_limit, raising=False)
    calls = 150
    ex = request.getfixturevalue("shared_executor") if cluster == "attached" else SulisDaskExecutor(2)
    try:
        def work() -> None:
            futures = [ex.submit(tasks.sleep_then_size, 0.01, numpy.frombuffer(os.urandom(size), numpy.uint8))
                       for _ in range(calls)]
            assert [f.result(timeout=60) for f in futures] == [size] * calls

        held = _shared_bytes_while(ex, work)
        # Batches in flight: two per worker thread, of a few calls each.
        in_flight = 2 * 2 * 4
        assert max(held) <= idle_limit + in_flight * size, (
            f"held up to {max(held) / 1e6:.0f} MB of the {calls * size / 1e6:.0f} MB sent")
        wait_until(lambda: _shared_bytes(ex) == 0, 10, "idle buffers to be released")
    finally:
        ex.shutdown()


class _ReleasingLock:
    """A lock after each release of which idle buffers are released at once:
    a releasing thread scheduled at the worst possible moment, every time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._releasing = False
        self.buffers = None

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()
        if self.buffers is not None and not self._releasing:
            self._releasing = True
            try:
                self.buffers.release_idle()
            finally:
                self._releasing = False


def test_a_buffer_idle_when_a_batch_reuses_it_is_not_released_under_it(tmp_path, monkeypatch):
    # Pure bookkeeping, with files only (no Dask). A batch reuses a buffer
    # that has just become idle; idle buffers are released between every
    # two steps of pickling it. The batch must get the buffer, claimed.
    import numpy

    from sulis_executor import _shared

    monkeypatch.setattr(_shared, "IDLE_RELEASE", 0.0)
    buffers = _shared.SharedBuffers(client=None, directory=str(tmp_path))
    data = numpy.zeros(_shared.SHARE_THRESHOLD, numpy.uint8)
    first = buffers.dumps([(len, (data,), {})])
    buffers.done(first.keys)  # idle now, and still there: nothing released it yet
    lock = buffers._lock = _ReleasingLock()
    lock.buffers = buffers
    again = buffers.dumps([(len, (data,), {})])  # used to raise KeyError here
    (path,) = [handle.path for handle in again.handles]
    assert os.path.exists(path), "the batch was handed a buffer already released"
    buffers.done(again.keys)
    assert not os.path.exists(path), "an idle buffer was kept past IDLE_RELEASE"
