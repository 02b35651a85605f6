"""Launch-mode selection and the launchers' pure parts, without SLURM or MPI.

``choose_launch_mode`` is checked against the real SLURM environment dumps in
``tests/data/slurm_env/`` plus the variables MPI launchers really set
(captured from ``srun --mpi=pmi2`` and the venv's ``mpiexec``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import dask.config
import pytest

from sulis_executor.config import LAUNCH_MODES, resolve_options
from sulis_executor.errors import ClusterStartupTimeout
from sulis_executor.launchers import choose_launch_mode, make_launcher, mpi_world_size
from sulis_executor.launchers._network import require_reachable, scheduler_host, validate_interface
from sulis_executor.launchers.base import Launcher
from sulis_executor.launchers.scheduler_file import (
    SchedulerFileLauncher,
    expected_workers,
    read_address,
)
from sulis_executor.launchers.srun import min_workers_for, srun_command
from sulis_executor.slurm import SlurmAllocation
from sulis_executor.worker import expand_name

pytestmark = pytest.mark.timeout(30)

DUMPS = Path(__file__).parent / "data" / "slurm_env"

# What `srun --mpi=pmi2` (SLURM 22.05) and MPICH's `mpiexec -n 2` set, as seen
# by rank 0 (the PMI_FD number varies).
SRUN_PMI2 = {"PMI_FD": "11", "PMI_JOBID": "4.0", "PMI_RANK": "0", "PMI_SIZE": "6"}
MPIEXEC_HYDRA = {"MPI_LOCALNRANKS": "2", "MPI_LOCALRANKID": "0", "PMI_FD": "9",
                 "PMI_HOSTNAME": "vm", "PMI_RANK": "0", "PMI_SIZE": "2"}


def dump(name: str) -> dict[str, str]:
    lines = (DUMPS / f"{name}.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def choose(environ: dict[str, str], **explicit: object) -> tuple[str, str]:
    options = resolve_options(explicit, environ, dask_config_get=lambda key: None)
    return choose_launch_mode(options, environ)


# -- auto selection ----------------------------------------------------------

@pytest.mark.parametrize("name", ["batch_step_multinode", "batch_mem_per_node",
                                  "batch_no_cpus_per_task", "batch_time_limit", "batch_gpus"])
def test_batch_script_chooses_srun(name: str) -> None:
    mode, reason = choose(dump(name))
    assert mode == "srun"
    assert "batch script" in reason and "SLURM job" in reason


def test_batch_reason_gives_layout() -> None:
    _, reason = choose(dump("batch_step_multinode"))
    assert "6 tasks on 3 nodes" in reason and "2 CPU(s) each" in reason


def test_salloc_shell_chooses_srun() -> None:
    mode, reason = choose(dump("salloc"))
    assert mode == "srun"
    assert "salloc" in reason


@pytest.mark.parametrize("name", ["srun_step_multinode", "srun_step_multinode_task3",
                                  "srun_step_subset", "srun_step_gpus"])
def test_srun_step_without_mpi_chooses_local_and_says_why(name: str) -> None:
    mode, reason = choose(dump(name))
    assert mode == "local"
    assert "step" in reason and "MPI" in reason and "own copy" in reason


def test_srun_mpi_step_chooses_mpi() -> None:
    mode, reason = choose({**dump("srun_step_multinode"), **SRUN_PMI2})
    assert mode == "mpi"
    assert "PMI_SIZE=6" in reason and "rank 0" in reason


def test_mpiexec_outside_slurm_chooses_mpi() -> None:
    assert choose(MPIEXEC_HYDRA)[0] == "mpi"


def test_mpi_world_of_one_is_not_mpi() -> None:
    mode, reason = choose({"PMI_SIZE": "1", "PMI_RANK": "0"})
    assert mode == "local"
    assert "PMI_SIZE=1" in reason


@pytest.mark.parametrize("environ, size", [
    ({"OMPI_COMM_WORLD_SIZE": "4"}, 4),
    ({"MV2_COMM_WORLD_SIZE": "3"}, 3),
    ({"PMIX_RANK": "0", "SLURM_STEP_NUM_TASKS": "5"}, 5),
    ({"PMI_SIZE": "not a number"}, None),
    ({}, None),
])
def test_mpi_world_size_from_environment(environ: dict[str, str], size: int | None) -> None:
    world = mpi_world_size(environ)
    assert (world[0] if world else None) == size


def test_laptop_chooses_local() -> None:
    mode, reason = choose({"HOME": "/home/me"})
    assert mode == "local"
    assert "no SLURM allocation" in reason


@pytest.mark.parametrize("explicit, mode", [
    ({"launch": "local"}, "local"),
    ({"address": "tcp://10.0.0.1:8786"}, "address"),
    ({"scheduler_file": "/shared/scheduler.json"}, "scheduler_file"),
])
def test_explicit_arguments_win_over_environment(explicit: dict[str, object], mode: str) -> None:
    environ = {**dump("srun_step_multinode"), **SRUN_PMI2}
    chosen, reason = choose(environ, **explicit)
    assert chosen == mode
    assert "argument" in reason


def test_environment_variable_launch_is_explicit() -> None:
    mode, reason = choose({**dump("batch_step_multinode"), "SULIS_EXECUTOR_LAUNCH": "local"})
    assert mode == "local"
    assert "SULIS_EXECUTOR_LAUNCH" in reason


def test_malformed_slurm_environment_names_the_variable() -> None:
    environ = {**dump("batch_step_multinode"), "SLURM_TASKS_PER_NODE": "two"}
    with pytest.raises(ValueError, match="SLURM_TASKS_PER_NODE"):
        choose(environ)


#: Options each mode needs to build its launcher (not to start it).
MODE_OPTIONS = {"address": {"address": "tcp://127.0.0.1:1"},
                "scheduler_file": {"scheduler_file": "scheduler.json"}}


@pytest.mark.parametrize("mode", [mode for mode in LAUNCH_MODES if mode != "auto"])
def test_every_mode_has_a_launcher_module(mode: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Each mode's module imports, and its launcher implements the whole
    interface (an abstract method left out would fail the construction)
    under the mode's name, the one ``launch=`` takes and logs show."""
    if mode == "srun":  # inside a batch script, with an srun to find
        for name, value in dump("batch_step_multinode").items():
            monkeypatch.setenv(name, value)
        fake_srun = tmp_path / "srun"
        fake_srun.write_text("#!/bin/sh\nexit 1\n")
        fake_srun.chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    options = resolve_options({"launch": mode, **MODE_OPTIONS.get(mode, {})}, {},
                              dask_config_get=lambda key: None)
    # attach: a cluster to join, which Dask's config names.
    joinable = {"scheduler-address": "tcp://127.0.0.1:1"} if mode == "attach" else {}
    with dask.config.set(joinable):
        launcher = make_launcher(mode, options)
    assert isinstance(launcher, Launcher)
    assert type(launcher).__module__ == f"sulis_executor.launchers.{mode}"
    assert type(launcher).name == launcher.name == mode


def test_auto_is_decided_before_any_launcher_is_made() -> None:
    with pytest.raises(ValueError, match="unknown launch mode"):
        make_launcher("auto", resolve_options({}, {}, dask_config_get=lambda key: None))


# -- srun: the command line and the worker count -----------------------------

def test_srun_command_covers_the_allocation() -> None:
    allocation = SlurmAllocation.from_environ(dump("batch_step_multinode"))
    assert allocation is not None
    command = srun_command(allocation, "sulis-workers-x", ["python", "-m", "w"])
    assert command[0] == "srun"
    # One task per node, with the node's CPUs: 2 tasks of 2 CPUs each.
    assert "--ntasks=3" in command and "--nodes=3" in command and "--ntasks-per-node=1" in command
    assert "--cpus-per-task=4" in command
    assert "--overlap" in command and "--kill-on-bad-exit=0" in command
    assert "--no-kill" in command  # a node SLURM declares failed ends only its workers
    assert "--input=all" in command  # the greeting, secrets included, reaches every task
    assert command[-3:] == ["python", "-m", "w"]


@pytest.mark.parametrize("wait, expected, minimum", [
    (None, 6, 6), (4, 6, 4), (10, 6, 6), (0.5, 6, 3), (0.8, 6, 5), (1.0, 6, 6), (0.01, 6, 1),
])
def test_min_workers(wait: float | int | None, expected: int, minimum: int) -> None:
    assert min_workers_for(wait, expected) == minimum


def test_srun_mode_outside_slurm_says_what_to_do() -> None:
    from sulis_executor.launchers.srun import SrunLauncher

    options = resolve_options({"launch": "srun"}, {}, dask_config_get=lambda key: None)
    with pytest.raises(RuntimeError, match="SLURM_JOB_ID is not set.*sbatch or salloc"):
        SrunLauncher(options, environ={})


# -- worker names -------------------------------------------------------------

def test_worker_name_template_from_slurm_task() -> None:
    environ = dump("srun_step_multinode_task3")
    assert expand_name("srun-{procid}", environ) == "srun-3"
    assert expand_name("{node}-{localid}", environ) == "n2-1"


def test_worker_name_template_from_mpi_rank() -> None:
    assert expand_name("mpi-{procid}", {"PMI_RANK": "4"}) == "mpi-4"


def test_plain_worker_names_are_unchanged() -> None:
    assert expand_name("local-0-1", {}) == "local-0-1"
    assert expand_name(None, {}) is None


def test_worker_name_template_missing_variable() -> None:
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        expand_name("srun-{procid}", {})
    with pytest.raises(ValueError, match="not a known field"):
        expand_name("srun-{bogus}", {"SLURM_PROCID": "1"})


# -- interfaces ----------------------------------------------------------------

def test_loopback_interface_is_valid() -> None:
    assert validate_interface("lo") == "127.0.0.1"
    assert scheduler_host("lo") == "127.0.0.1"


def test_loopback_is_refused_when_workers_run_on_other_nodes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURMD_NODENAME", "n1")
    with pytest.raises(ValueError) as info:
        require_reachable("127.0.0.1", "lo", ("n1", "n2", "n3"))
    message = str(info.value)
    assert "'lo'" in message and "loopback address 127.0.0.1" in message
    assert "(n2, n3)" in message and "SULIS_EXECUTOR_INTERFACE" in message
    assert "lo (127.0.0.1)" in message  # this node's interfaces, to choose from
    with pytest.raises(ValueError, match="no interface is named"):
        require_reachable("127.0.0.1", None, ("n1", "n2"))


def test_loopback_is_fine_on_one_node_and_other_addresses_anywhere(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURMD_NODENAME", "n1")
    require_reachable("127.0.0.1", "lo", ("n1",))
    require_reachable("10.77.0.11", "eth0", ("n1", "n2", "n3"))
    require_reachable("node001", None, ("n1", "n2"))


def test_unknown_interface_lists_the_available_ones() -> None:
    with pytest.raises(ValueError) as info:
        validate_interface("ib7-does-not-exist")
    message = str(info.value)
    assert "'ib7-does-not-exist' does not exist" in message
    assert "lo (127.0.0.1)" in message


def test_worker_rejects_unknown_interface(capsys: pytest.CaptureFixture[str]) -> None:
    from sulis_executor import worker

    status = worker.main(["tcp://127.0.0.1:1", "--interface", "nope0"], die_with_parent=False)
    assert status == 2
    assert "available interfaces" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_worker_waiting_for_its_scheduler_address_exits_quietly_when_input_ends() -> None:
    # A local worker starts before its scheduler and reads the address from
    # its standard input; if the launcher gives up first, the input just ends.
    proc = subprocess.run(
        [sys.executable, "-m", "sulis_executor.worker", "-"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=50,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def _authkey() -> str:
    import multiprocessing

    return bytes(multiprocessing.current_process().authkey).hex()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("tls", [True, False])
def test_worker_takes_the_job_secrets_from_its_greeting_not_its_environment(tls: bool) -> None:
    """How ``srun`` workers get the TLS credentials (if any) and the client's
    ``multiprocessing`` key, which ``Manager`` proxies authenticate with: in
    the JSON line on their standard input, which leaves no copy in
    ``/proc/PID/environ``."""
    from distributed import Client, LocalCluster

    from sulis_executor._security import generate_credentials, security_from

    credentials = generate_credentials() if tls else {}
    security = security_from(credentials) if tls else None
    authkey = os.urandom(32).hex()  # not this process's: the worker must take it
    greeting = {"scheduler": "", "authkey": authkey}
    if tls:
        greeting["credentials"] = credentials
    with LocalCluster(n_workers=0, host="127.0.0.1", scheduler_port=0, dashboard_address="127.0.0.1:0",
                      security=security, protocol="tls://" if tls else "tcp://") as cluster, \
            Client(cluster, security=security) as client:
        greeting["scheduler"] = cluster.scheduler_address
        worker = subprocess.Popen(
            [sys.executable, "-m", "sulis_executor.worker", "-", "--host", "127.0.0.1"],
            stdin=subprocess.PIPE,
        )
        try:
            assert worker.stdin is not None
            worker.stdin.write(json.dumps(greeting).encode() + b"\n")
            worker.stdin.close()
            client.wait_for_workers(1, timeout=60)
            [key] = client.run(_authkey).values()
            environ = Path(f"/proc/{worker.pid}/environ").read_bytes()
        finally:
            worker.kill()
            worker.wait()
    assert key == authkey
    assert authkey.encode() not in environ
    key_lines = [line for line in credentials.get("key", "").splitlines() if not line.startswith("-----")]
    assert not any(line.encode() in environ for line in key_lines)


# -- scheduler file --------------------------------------------------------------

def test_read_address_tolerates_missing_and_partial_files(tmp_path: Path) -> None:
    path = tmp_path / "scheduler.json"
    assert read_address(str(path)) is None
    path.write_text('{"address": "tcp://1')
    assert read_address(str(path)) is None
    path.write_text(json.dumps({"address": "tcp://10.0.0.1:8786", "type": "Scheduler"}))
    assert read_address(str(path)) == "tcp://10.0.0.1:8786"


@pytest.mark.parametrize("wait, environ, expected", [
    (None, {}, 0),
    (3, {}, 3),
    (None, "batch_step_multinode", 6),
    (0.5, "batch_step_multinode", 3),
    (2, "batch_step_multinode", 2),
])
def test_scheduler_file_expected_workers(wait: float | int | None, environ: object, expected: int) -> None:
    env = dump(environ) if isinstance(environ, str) else {}
    assert expected_workers(wait, env) == expected


def _launcher(path: Path, timeout: float) -> SchedulerFileLauncher:
    options = resolve_options({"scheduler_file": str(path), "timeout": timeout}, {},
                              dask_config_get=lambda key: None)
    return SchedulerFileLauncher(options, environ={})


def _dead_address() -> str:
    # A port nobody listens on: bind, note it, close.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def test_stale_scheduler_file_fails_after_timeout_naming_path_and_address(tmp_path: Path) -> None:
    path = tmp_path / "scheduler.json"
    address = _dead_address()
    path.write_text(json.dumps({"address": address}))
    started = time.monotonic()
    with pytest.raises(ClusterStartupTimeout) as info:
        _launcher(path, timeout=1.0).start(1.0)
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 5.0
    assert str(path) in str(info.value) and address in str(info.value)
    assert "left over" in str(info.value)
    assert isinstance(info.value, TimeoutError)


def test_missing_scheduler_file_fails_after_timeout(tmp_path: Path) -> None:
    path = tmp_path / "never.json"
    with pytest.raises(ClusterStartupTimeout, match="does not exist.*dask scheduler"):
        _launcher(path, timeout=0.5).start(0.5)


def test_scheduler_file_attaches_once_a_scheduler_answers(tmp_path: Path) -> None:
    path = tmp_path / "scheduler.json"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        path.write_text(json.dumps({"address": address}))
        cluster = _launcher(path, timeout=5.0).start(5.0)
    assert cluster.target == address
    assert str(path) in cluster.description


def test_scheduler_file_mode_end_to_end(tmp_path: Path) -> None:
    """A real ``dask scheduler`` and ``dask worker`` (plain TCP, as Dask's
    commands start them), attached to through the file."""
    from sulis_executor import SulisDaskExecutor

    path = tmp_path / "scheduler.json"
    common = ["--no-dashboard", "--dashboard-address", "127.0.0.1:0"]
    env = {**os.environ, "DASK_LOGGING__DISTRIBUTED": "error"}
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "dask", "scheduler", "--scheduler-file", str(path),
         "--host", "127.0.0.1", "--port", "0", *common], env=env)
    worker = subprocess.Popen(
        [sys.executable, "-m", "dask", "worker", "--scheduler-file", str(path),
         "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny", "--death-timeout", "30",
         "--no-dashboard"], env=env)
    try:
        with SulisDaskExecutor(scheduler_file=str(path), wait_for_workers=1, timeout=60) as ex:
            assert ex.launch_mode == "scheduler_file"
            assert list(ex.map(abs, [-1, -2, 3])) == [1, 2, 3]
    finally:
        scheduler.terminate()
        for proc in (scheduler, worker):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
