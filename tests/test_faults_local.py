"""Nothing lost, nothing hung, no one else let in: the local-mode faults.

* A client without this cluster's credentials is refused, over ``tls://``
  with some other self-signed certificate and over plain ``tcp://`` to the
  same port; the executor's own work still runs.
* Ctrl-C (SIGINT to the process group) of a script in the middle of a
  ``map`` leaves no worker process behind.
* A client killed outright (SIGKILL) leaves neither workers nor its private
  files (credentials, shared buffers) behind.
* ``terminate_workers()`` and ``kill_workers()`` (``ProcessPoolExecutor``'s
  since Python 3.14) end the worker processes at once, even mid-call: the
  running calls fail as a broken pool, the queued ones are cancelled, and
  no process is left.
* A garbage SLURM variable in a batch environment fails the constructor at
  once with a ``ValueError`` naming the variable.

The SLURM counterparts run as real jobs in ``tests/slurm/test_faults_slurm.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from sulis_executor import SulisDaskExecutor
from tests import executor_tasks as tasks
from tests.waiting import alive_after, wait_until

REPO = Path(__file__).resolve().parents[1]
DUMPS = REPO / "tests" / "data" / "slurm_env"


def refused(address: str, security: object, timeout: float = 3.0) -> str:
    """Try to connect a Client; return how it was refused (or fail)."""
    from distributed import Client

    started = time.monotonic()
    try:
        client = Client(address, security=security, timeout=timeout, set_as_default=False)
    except Exception as error:  # noqa: BLE001 - any refusal will do
        elapsed = time.monotonic() - started
        assert elapsed < timeout + 10, f"refusal took {elapsed:.1f} s"
        return f"{type(error).__name__}: {error}"
    client.close()
    raise AssertionError(f"a client without the job's credentials connected to {address}")


@pytest.mark.timeout(60)
def test_local_cluster_refuses_clients_without_its_credentials() -> None:
    from distributed.security import Security

    with SulisDaskExecutor(max_workers=1) as ex:
        address = ex.client.scheduler.address
        assert address.startswith("tls://"), address
        hostport = address[len("tls://"):]
        tls_error = refused(address, Security.temporary())
        tcp_error = refused(f"tcp://{hostport}", None)
        # ... and the cluster still works for its owner.
        assert list(ex.map(pow, range(10), [2] * 10)) == [i * i for i in range(10)]
    assert tls_error and tcp_error


#: What a script started from a terminal has. A test run started in the
#: background by a shell without job control (``sh -c 'pytest ... &'``)
#: ignores SIGINT, and so would the script (and Python would install no
#: KeyboardInterrupt handler), which would make Ctrl-C do nothing.
TERMINAL_SIGINT = "signal.signal(signal.SIGINT, signal.default_int_handler)\n"

CTRL_C_SCRIPT = """
import faulthandler, json, os, signal, time
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test's hang report
""" + TERMINAL_SIGINT + """
from sulis_executor import SulisDaskExecutor

def slow(x):
    time.sleep(0.02)
    return x

with SulisDaskExecutor(max_workers=2) as ex:
    pids = sorted(ex._launcher.worker_pids())  # the agent and its 2 members
    print("READY " + json.dumps({"main": os.getpid(), "workers": pids}), flush=True)
    for _ in ex.map(slow, range(10**6)):
        pass
"""


def _start_script(tmp_path: Path, source: str, **environ: str) -> subprocess.Popen[str]:
    """Run ``source`` as a script of its own (in its own session, so the test
    can signal its whole process group), with this repository importable,
    and ``environ`` in its environment."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    env = dict(os.environ, **environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))
    return subprocess.Popen(
        [sys.executable, str(script)], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )


def _wait_for_ready(proc: subprocess.Popen[str], deadline: float) -> dict[str, object]:
    assert proc.stdout is not None
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("READY "):
            ready: dict[str, object] = json.loads(line[len("READY "):])
            return ready
    proc.kill()
    raise AssertionError(f"the script never got ready; its output: {''.join(seen)}")


@pytest.fixture(params=["idle", "busy"])
def machine_load(request: pytest.FixtureRequest):
    """``busy``: two processes spin on the CPUs for the whole test, as other
    jobs on a shared node do, so that every thread waits for its turn."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(2 if request.param == "busy" else 0)]
    yield request.param
    for spinner in spinners:
        spinner.kill()
        spinner.wait()


@pytest.mark.timeout(60)
def test_no_python_code_runs_in_the_garbage_collectors_callbacks(host_executor: SulisDaskExecutor) -> None:
    """A Ctrl-C whose KeyboardInterrupt lands in Python code run by the
    garbage collector is printed and lost ("Exception ignored in"), and the
    script then waits for ever. Dask's scheduler, which runs in our process,
    puts such a callback in ``gc.callbacks`` (its GC diagnosis); with it, the
    Ctrl-C test below hung in about 1 run in 4."""
    import gc
    import types

    assert host_executor.submit(abs, -1).result(timeout=30) == 1
    python_callbacks = [cb for cb in gc.callbacks
                        if isinstance(cb, (types.FunctionType, types.MethodType))
                        and getattr(cb, "__module__", "").startswith("distributed")]
    assert python_callbacks == []


@pytest.mark.timeout(90)
@pytest.mark.parametrize("target", ["group", "main"])
def test_ctrl_c_in_a_map_leaves_no_worker_behind(tmp_path: Path, target: str, machine_load: str) -> None:
    """``group``: what a terminal's Ctrl-C does (SIGINT to every process of the
    foreground group, workers included); ``main``: only the script's process
    gets it (``kill -INT <pid>``)."""
    proc = _start_script(tmp_path, CTRL_C_SCRIPT)
    try:
        ready = _wait_for_ready(proc, time.monotonic() + 60)
        workers = list(ready["workers"])  # type: ignore[call-overload]
        assert len(workers) == 3 and ready["main"] == proc.pid, ready
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        if target == "group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGINT)
        started = time.monotonic()
        try:
            _, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGUSR1)
            try:
                _, stderr = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                _, stderr = proc.communicate()
            raise AssertionError(f"the script did not exit within 30 s of Ctrl-C:\n{stderr}") from None
        elapsed = time.monotonic() - started
        assert proc.returncode != 0, stderr
        assert "KeyboardInterrupt" in stderr, stderr
        left = alive_after(sorted(set(workers) | set(children)), timeout=5)
        assert not left, (f"processes left {elapsed:.1f} s after Ctrl-C: "
                          f"{[psutil.Process(p).cmdline() for p in left]}")
        assert elapsed < 20, f"exit took {elapsed:.1f} s after Ctrl-C"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


CTRL_C_AT_START_SCRIPT = """
import signal
""" + TERMINAL_SIGINT + """
from sulis_executor import SulisDaskExecutor, _startup

# Say when start-up has come to waiting for the workers (everything else
# it does is done by then).
wait_for_workers = _startup._wait_for_workers

def announced(*args):
    print("WAITING", flush=True)
    return wait_for_workers(*args)

_startup._wait_for_workers = announced
SulisDaskExecutor(max_workers=2, timeout=60)
"""

#: Imported by every worker process (and the fork server) at start, since
#: the script's directory is on their path: hold them until the test says.
SLOW_WORKER_START = """
import pathlib, time
here = pathlib.Path(__file__).parent
(here / "worker-starting").touch()
deadline = time.monotonic() + 60
while not (here / "go").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("target", ["group", "main"])
def test_ctrl_c_while_the_executor_waits_for_its_workers_leaves_nothing_behind(
        tmp_path: Path, target: str) -> None:
    """Start-up must stay interruptible (in ``srun`` mode it may wait 30 s
    for workers): the signals its threads leave to the main thread are not
    left blocked in the main thread. (Without numpy's BLAS threads, which
    would take a signal the main thread blocks, and so hide that.)"""
    (tmp_path / "sitecustomize.py").write_text(SLOW_WORKER_START)
    proc = _start_script(tmp_path, CTRL_C_AT_START_SCRIPT, OPENBLAS_NUM_THREADS="1")
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "WAITING\n", proc.communicate()
        assert (tmp_path / "worker-starting").exists()
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert children
        (os.killpg if target == "group" else os.kill)(proc.pid, signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError("the script did not exit within 30 s of Ctrl-C") from None
        assert proc.returncode != 0 and "KeyboardInterrupt" in stderr, stderr
        assert not alive_after(children, timeout=10), "processes left after Ctrl-C"
    finally:
        (tmp_path / "go").touch()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def threads_taking(signum: int) -> dict[int, str]:
    """This process's threads (native ids) that do not block ``signum``,
    with their names where Python knows them."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    taking = {}
    for task in os.listdir("/proc/self/task"):
        try:
            status = Path(f"/proc/self/task/{task}/status").read_text()
        except OSError:  # ended since
            continue
        blocked = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
        if not blocked & (1 << (signum - 1)):
            taking[int(task)] = names.get(int(task), "(a thread Python did not start)")
    return taking


@pytest.mark.timeout(90)
@pytest.mark.parametrize("cluster", ["local", "spawn", "attached"])
def test_only_the_main_thread_takes_ctrl_c_and_sigterm(
        cluster: str, scheduler_address: str, request: pytest.FixtureRequest) -> None:
    """Python acts on a signal in the main thread only, and the kernel hands
    a signal sent to the process to any thread that does not block it: one
    that landed on another thread would leave a main thread waiting in
    ``future.result()`` deaf to Ctrl-C. So the threads the executor starts,
    and Dask's, block SIGINT and SIGTERM; all but the results thread, which
    runs the futures' done callbacks: a process one of them starts would
    begin with the signals blocked, deaf to Ctrl-C and to ``terminate()``.
    (Importing Dask starts numpy's BLAS threads, which are not the
    executor's: they were there before.)"""
    import distributed  # noqa: F401

    before = set(threads_taking(signal.SIGINT)) | set(threads_taking(signal.SIGTERM))
    if cluster == "attached":
        ex = request.getfixturevalue("shared_executor")
    else:
        ex = SulisDaskExecutor(max_workers=2, mp_context="spawn" if cluster == "spawn" else None)
    with ex:
        # Threads started on first use too: map runners, tasks, fetched results.
        assert list(ex.map(tasks.square, range(200))) == [i * i for i in range(200)]
        assert ex.submit(tasks.square, 3).result(timeout=30) == 9
        assert ex.submit(bytes, 2_000_000).result(timeout=30) == bytes(2_000_000)
        for signum in (signal.SIGINT, signal.SIGTERM):
            taking = threads_taking(signum)
            assert threading.main_thread().native_id in taking, "the main thread blocks it"
            started = {tid: name for tid, name in taking.items()
                       if tid not in before and not name.startswith("sulis-executor-results-")}
            assert not started, f"threads the executor started take {signum.name}: {started}"


@pytest.mark.timeout(60)
def test_a_process_started_by_a_done_callback_takes_sigterm(tmp_path: Path) -> None:
    # Done callbacks run in the executor's results thread; a process started
    # there must not inherit signals blocked for the main thread's sake.
    from tests import contract_helpers as h

    started, release = tmp_path / "started", tmp_path / "release"
    children: list[subprocess.Popen[bytes]] = []
    with SulisDaskExecutor(max_workers=1) as ex:
        future = ex.submit(h.block, str(started), str(release))
        future.add_done_callback(lambda _: children.append(
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])))
        wait_until(started.exists, 30, "the call to start")
        release.touch()
        future.result(timeout=30)
        wait_until(lambda: children, 10, "the callback's process")
    children[0].terminate()
    assert children[0].wait(timeout=10) == -signal.SIGTERM


KILLED_CLIENT_SCRIPT = """
import json, os, time
import numpy
from sulis_executor import SulisDaskExecutor

def hold(array):
    time.sleep(60)

ex = SulisDaskExecutor(max_workers=2)
future = ex.submit(hold, numpy.random.rand(500_000))  # 4 MB: travels as a file
while not future.running():
    time.sleep(0.01)
launcher = ex._launcher
print("READY " + json.dumps({
    "main": os.getpid(),
    "workers": sorted(launcher.worker_pids()),
    "private": [launcher._shared.path, launcher._credentials.directory],
}), flush=True)
time.sleep(120)
"""


@pytest.mark.timeout(90)
def test_a_killed_client_leaves_no_workers_and_no_private_files_behind(tmp_path: Path) -> None:
    """SIGKILL gives the client no chance to clean up: its workers, which die
    with it, remove its credentials and shared-buffer files on the way out."""
    proc = _start_script(tmp_path, KILLED_CLIENT_SCRIPT)
    try:
        ready = _wait_for_ready(proc, time.monotonic() + 60)
        private = [Path(p) for p in ready["private"]]  # type: ignore[attr-defined]
        assert all(p.is_dir() for p in private) and any(private[0].iterdir()), private
        # The workers, and whatever else the client started (its fork server).
        started = set(ready["workers"]) | {  # type: ignore[call-overload]
            c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        left = alive_after(sorted(started), timeout=30)
        assert not left, f"processes outlived their killed client: {left}"
        assert not [p for p in private if p.exists()], "private files left behind"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.timeout(60)
def test_a_worker_whose_launcher_died_before_it_started_exits_at_once() -> None:
    # A worker asks to die with its parent as it starts. A launcher that
    # died before that is caught by its pid: the worker finds someone else
    # as its parent (here, since we launch it, by being told another pid).
    def start_worker(parent_pid: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "sulis_executor.worker", "-", f"--parent-pid={parent_pid}"],
                                stdin=subprocess.PIPE)

    waiting = start_worker(os.getpid())
    orphan = start_worker(os.getppid())
    try:
        # Neither gets a greeting, and both keep their standard input open.
        assert orphan.wait(timeout=30) == 0
        assert waiting.poll() is None, "a worker with its launcher alive waits for the greeting"
        waiting.stdin.close()  # the launcher gave up before the scheduler started
        assert waiting.wait(timeout=30) == 0
    finally:
        for proc in (waiting, orphan):
            proc.kill()
            proc.wait()


# --- garbage SLURM variables ----------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["terminate_workers", "kill_workers"])
def test_terminating_or_killing_the_workers_ends_them_at_once_even_mid_call(
        tmp_path: Path, method: str, no_process_left: None) -> None:
    from concurrent.futures.process import BrokenProcessPool

    started = tmp_path / "started"
    with SulisDaskExecutor(max_workers=2) as ex:
        workers = set(ex._launcher.worker_pids())
        running = [ex.submit(tasks.append_line_then_sleep, str(started), str(i), 600) for i in range(2)]
        wait_until(lambda: started.exists() and len(started.read_text().split()) == 2,
                   what="both long calls to start")
        waiting = [ex.submit(tasks.square, i) for i in range(8)]
        getattr(ex, method)()
        for future in running:
            with pytest.raises(BrokenProcessPool, match=rf"by {method}\(\)"):
                future.result(timeout=10)
        # Calls no worker had started never run: cancelled, or failed with the pool.
        for future in waiting:
            assert future.cancelled() or isinstance(future.exception(timeout=10), BrokenProcessPool)
        assert any(future.cancelled() for future in waiting)
        with pytest.raises(RuntimeError):
            ex.submit(tasks.square, 1)
        assert alive_after(workers, timeout=20) == []


def batch_environment() -> dict[str, str]:
    """A real batch script's environment (3 nodes x 2 tasks), captured on the
    test cluster; auto mode picks ``srun`` in it."""
    lines = (DUMPS / "batch_step_multinode.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("variable, value", [
    ("SLURM_CPUS_PER_TASK", "abc"),
    ("SLURM_CPUS_PER_TASK", "0"),
    ("SLURM_TASKS_PER_NODE", "2(x3"),
    ("SLURM_TASKS_PER_NODE", "two"),
    ("SLURM_JOB_NODELIST", "n[1-3"),
    ("SLURM_NTASKS", "-6"),
    ("SLURM_MEM_PER_CPU", "lots"),
])
def test_garbage_slurm_variable_raises_value_error_naming_it(
        monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    for name, setting in batch_environment().items():
        monkeypatch.setenv(name, setting)
    monkeypatch.setenv(variable, value)
    started = time.monotonic()
    with pytest.raises(ValueError, match=variable) as caught:
        SulisDaskExecutor(timeout=5)
    assert time.monotonic() - started < 5
    assert value in str(caught.value), caught.value
