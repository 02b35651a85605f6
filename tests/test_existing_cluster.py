"""Joining the cluster a process already uses, and mixing with the user's own Client.

``launch='auto'`` joins (``launch='attach'``) a cluster the script set up
before the executor was dropped in: dask-mpi's (run as real jobs in
``tests/slurm/test_sulis_page_recipes.py``), the user's open
``distributed.Client``, or one Dask's config names. While open, an
executor names its own cluster in Dask's config, so a bare ``Client()``
inside it joins that cluster. See ``sulis_executor.launchers._existing``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import types

import dask.config
import pytest
from distributed import Client, LocalCluster

from sulis_executor import SulisDaskExecutor
from sulis_executor.config import resolve_options
from sulis_executor.launchers import choose_launch_mode
from sulis_executor.launchers._existing import ExistingCluster, end_dask_mpi_cluster
from sulis_executor.launchers.scheduler_file import read_address
from tests import contract_helpers as h
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def user_cluster():
    """A cluster of the user's own: 2 worker processes, plain TCP on loopback."""
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address=None, silence_logs=logging.CRITICAL) as cluster:
        yield cluster


def test_an_executor_opened_while_the_users_client_is_open_joins_its_cluster(user_cluster, caplog):
    with Client(user_cluster) as client:
        with caplog.at_level(logging.INFO, logger="sulis_executor"):
            with SulisDaskExecutor() as ex:
                assert ex.launch_mode == "attach"
                assert ex.client.scheduler.address == user_cluster.scheduler_address
                assert ex.num_workers == 2
                assert list(ex.map(h.square, range(50))) == [x * x for x in range(50)]
        assert "launch mode 'attach': a distributed.Client is open in this process" in caplog.text
        # The executor left the cluster, and the user's client, as they were.
        assert client.submit(h.square, 7).result(timeout=30) == 49
        assert len(client.scheduler_info()["workers"]) == 2


def test_a_client_opened_inside_the_executor_joins_the_executors_cluster():
    before = dask.config.get("scheduler-address", None)
    with SulisDaskExecutor(max_workers=2) as ex:
        # The executor's cluster uses TLS: Dask's config holds the address
        # and the credentials to reach it.
        with Client() as client:
            assert client.scheduler.address == ex.client.scheduler.address
            assert client.submit(h.square, 3).result(timeout=30) == 9
        # Closing that client leaves the executor working.
        assert ex.submit(h.square, 4).result(timeout=30) == 16
    assert dask.config.get("scheduler-address", None) == before


def test_an_executor_opened_inside_another_starts_its_own_cluster():
    with SulisDaskExecutor(max_workers=1) as outer:
        with SulisDaskExecutor(max_workers=1) as inner:
            assert inner.launch_mode == "local"
            assert inner.client.scheduler.address != outer.client.scheduler.address
            assert dask.config.get("scheduler-address") == inner.client.scheduler.address
        # Closed in order, the outer one is named again.
        assert dask.config.get("scheduler-address") == outer.client.scheduler.address


def test_executors_closed_out_of_order_leave_the_open_one_named():
    before = dask.config.get("scheduler-address", None)
    first = SulisDaskExecutor(max_workers=1)
    second = SulisDaskExecutor(max_workers=1)
    first.shutdown()
    assert dask.config.get("scheduler-address") == second.client.scheduler.address
    second.shutdown()
    assert dask.config.get("scheduler-address", None) == before


def test_a_scheduler_named_by_dask_config_is_joined(user_cluster, caplog):
    with dask.config.set({"scheduler-address": user_cluster.scheduler_address}):
        with caplog.at_level(logging.INFO, logger="sulis_executor"):
            with SulisDaskExecutor() as ex:
                assert ex.launch_mode == "attach"
                assert ex.submit(h.square, 5).result(timeout=30) == 25
    assert "Dask's config names a scheduler" in caplog.text
    assert len(user_cluster.scheduler.workers) == 2  # left running


def test_an_executor_opened_inside_one_that_joined_a_cluster_joins_it_too(user_cluster):
    with dask.config.set({"scheduler-address": user_cluster.scheduler_address}):
        with SulisDaskExecutor() as outer, SulisDaskExecutor() as inner:
            assert (outer.launch_mode, inner.launch_mode) == ("attach", "attach")
            assert inner.client.scheduler.address == user_cluster.scheduler_address
        assert dask.config.get("scheduler-address") == user_cluster.scheduler_address


def test_an_explicit_launch_mode_starts_a_cluster_of_its_own_beside_the_users(user_cluster):
    with Client(user_cluster):
        with SulisDaskExecutor(launch="local", max_workers=1) as ex:
            assert ex.launch_mode == "local"
            assert ex.client.scheduler.address != user_cluster.scheduler_address


def test_launch_attach_with_no_cluster_in_the_process_says_what_to_do():
    with pytest.raises(ValueError, match="launch='attach' joins the Dask cluster this process"):
        SulisDaskExecutor(launch="attach")


# -- the choice, as pure logic ------------------------------------------------

DASK_MPI = ExistingCluster("dask_mpi", "tcp://10.0.0.1:1234", None, 4, "dask_mpi.initialize() ran", "")
SRUN_PMI2 = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "6", "SLURM_NNODES": "3",
             "SLURM_JOB_NUM_NODES": "3", "SLURM_TASKS_PER_NODE": "2(x3)", "SLURM_NODELIST": "n[1-3]",
             "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_CPUS_ON_NODE": "2", "PMI_RANK": "1",
             "PMI_SIZE": "6"}


def choose(environ, existing, **explicit):
    options = resolve_options(explicit, environ, dask_config_get=lambda key: None)
    return choose_launch_mode(options, environ, existing)


def test_an_existing_cluster_wins_over_the_mpi_world_it_runs_in():
    # dask_mpi.initialize() on rank 1 of srun --mpi=pmi2: not the MPI mode,
    # whose rank 1 would wait for an address rank 0 never sends.
    assert choose(SRUN_PMI2, DASK_MPI) == ("attach", "dask_mpi.initialize() ran")
    assert choose(SRUN_PMI2, None)[0] == "mpi"


@pytest.mark.parametrize("explicit, mode", [
    ({"launch": "local"}, "local"),
    ({"address": "tcp://10.0.0.2:1"}, "address"),
    ({"scheduler_file": "s.json"}, "scheduler_file"),
])
def test_explicit_arguments_win_over_an_existing_cluster(explicit, mode):
    assert choose({}, DASK_MPI, **explicit)[0] == mode


# -- dask-mpi's cluster at exit -----------------------------------------------


def dask_command(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_ending_dask_mpis_cluster_closes_the_workers_then_the_scheduler(tmp_path):
    # As dask-mpi runs them: a scheduler, and workers without a nanny.
    path = str(tmp_path / "scheduler.json")
    processes = [dask_command("scheduler", "--scheduler-file", path, "--host", "127.0.0.1",
                              "--port", "0", "--no-dashboard")]
    try:
        wait_until(lambda: read_address(path) is not None, 30, "the scheduler file")
        address = read_address(path)
        processes += [dask_command("worker", address, "--no-nanny", "--nthreads", "1",
                                   "--host", "127.0.0.1", "--no-dashboard") for _ in range(2)]
        with Client(address, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=30)
        end_dask_mpi_cluster(address, None)
        logs = [process.communicate(timeout=30)[1] for process in processes]
        assert [process.returncode for process in processes] == [0, 0, 0], logs
        for log in logs[1:]:
            # Asked to close, not left by a scheduler closing under it.
            assert "Reason: scheduler-close-worker" in log, log
            assert "Traceback" not in log, log
    finally:
        for process in processes:
            process.kill()
            process.wait()


@pytest.mark.timeout(25)
def test_ending_dask_mpis_cluster_once_the_script_has_shut_it_down_does_nothing(capfd):
    # dask-mpi's own hook waits 30 s for the scheduler, then prints an OSError.
    with LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address=None,
                      silence_logs=logging.CRITICAL) as cluster:
        address = cluster.scheduler_address
    capfd.readouterr()
    end_dask_mpi_cluster(address, None)
    assert capfd.readouterr() == ("", "")


# -- the MPI mode's diagnosis when rank 0 never sends its address ------------


def no_address_error(monkeypatch, dask_mpi_imported: bool) -> str:
    from sulis_executor.launchers.mpi import MpiLauncher

    if dask_mpi_imported:
        monkeypatch.setitem(sys.modules, "dask_mpi", types.ModuleType("dask_mpi"))
    else:
        monkeypatch.delitem(sys.modules, "dask_mpi", raising=False)
    launcher = MpiLauncher(resolve_options({}, {}, dask_config_get=lambda key: None))
    launcher.rank = 1
    return launcher._no_address_error(30)


def test_a_rank_left_without_an_address_after_dask_mpi_initialize_is_told_why(monkeypatch):
    message = no_address_error(monkeypatch, dask_mpi_imported=True)
    assert message.startswith("MPI rank 1 waited 30 s for rank 0")
    assert "dask_mpi.initialize() ran, so rank 0 runs dask-mpi's scheduler" in message
    assert "launch='attach'" in message


def test_a_rank_left_without_an_address_is_told_to_look_at_rank_0(monkeypatch):
    message = no_address_error(monkeypatch, dask_mpi_imported=False)
    assert "rank 0 has not constructed SulisDaskExecutor" in message
    assert "dask" not in message.replace("SulisDaskExecutor", "")
