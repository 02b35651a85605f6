"""Work is never dropped at exit or on garbage collection.

As with ``ProcessPoolExecutor``, run side by side wherever it behaves the same:

* A script that submits calls and ends without ``shutdown()`` or ``with``
  runs them to completion before the interpreter exits.
* ``submit`` and ``map`` from an ``atexit`` handler, once interpreter
  shutdown has begun, raise ``RuntimeError('cannot schedule new futures
  after interpreter shutdown')`` (``ProcessPoolExecutor`` says "after
  shutdown" there once its workers have started). Ours also refuses to
  start a new executor then.
* ``shutdown(wait=False)`` while a call runs, then the end of the script:
  the call completes and the script exits. Ours only: CPython skips its own
  test of this (gh-83386) for ``ProcessPoolExecutor``, which can hang there.
  The script runs several times at once, since the hang it guards against
  (Dask could no longer take the call in once ``concurrent.futures`` had
  stopped its thread pools) came in about one run of three.
* Ctrl-C while the interpreter waits at exit ends the wait, and no process
  is left behind. Ours only: ``ProcessPoolExecutor``'s workers are joined
  by ``multiprocessing`` after that, running call and all.
* An executor garbage collected while its futures or its ``map`` results
  are still held: every result arrives (our ``map`` is lazy, so its
  iterator goes on submitting chunks), and the executor's processes exit
  once the work and the iterator are done.
* After an explicit ``shutdown()``, a ``map`` iterator that needs to
  submit more raises, as CPython 3.14's ``buffersize`` map does, even once
  the executor is collected.

Each exit case is a real script run with ``sys.executable``; it prints the
pids of the processes it started, and the test checks they are all gone.
"""

from __future__ import annotations

import concurrent.futures
import gc
import itertools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from sulis_executor import SulisDaskExecutor
from tests import contract_helpers as h
from tests.waiting import alive, alive_after, wait_until

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parent.parent

#: A script that has not exited by then hangs (a normal one takes seconds).
SCRIPT_TIMEOUT = 120

#: How each script makes its executor: two workers; ProcessPoolExecutor's
#: forked from a fork server, never from the script's threaded process.
EXECUTORS = {
    "ProcessPoolExecutor": 'ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver"))',
    "SulisDaskExecutor": "SulisDaskExecutor(2)",
}

PRELUDE = """\
import atexit, faulthandler, json, multiprocessing, os, signal, threading
from concurrent.futures import ProcessPoolExecutor

import psutil

from sulis_executor import SulisDaskExecutor
from tests import contract_helpers as h
from tests.waiting import wait_until

faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test's hang report


def report_children():
    pids = [child.pid for child in psutil.Process().children(recursive=True)]
    print("CHILDREN " + json.dumps(pids), flush=True)
"""


@dataclass
class Ran:
    returncode: int
    lines: list[str]  # the script's output, less the CHILDREN report
    stderr: str
    children: list[int]


def write_script(tmp_path: Path, body: str, executor: str) -> Path:
    script = tmp_path / "script.py"
    script.write_text(PRELUDE + textwrap.dedent(body).replace("EXECUTOR", EXECUTORS[executor]))
    return script


def start(script: Path) -> subprocess.Popen[str]:
    # In a session of its own, so that a hung script can be killed with
    # everything it started.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))
    return subprocess.Popen([sys.executable, str(script)], cwd=script.parent, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def finish(proc: subprocess.Popen[str], timeout: float = SCRIPT_TIMEOUT) -> tuple[str, str]:
    """The script's output once it exits; fail, with its threads' stacks,
    if it has not within ``timeout`` seconds."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGUSR1)
        try:
            stdout, stderr = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            stdout, stderr = "", ""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"the script had not exited after {timeout} s; its output:\n"
                             f"{stdout}\nand its threads:\n{stderr}") from None


def parse(returncode: int, stdout: str, stderr: str) -> Ran:
    lines, children = [], []
    for line in stdout.splitlines():
        if line.startswith("CHILDREN "):
            children += json.loads(line[len("CHILDREN "):])
        else:
            lines.append(line)
    return Ran(returncode, lines, stderr, children)


def run_script(script: Path) -> Ran:
    proc = start(script)
    stdout, stderr = finish(proc)
    return parse(proc.returncode, stdout, stderr)


def assert_clean_exit(ran: Ran) -> None:
    """Exit status 0, nothing on stderr, and every process it started gone."""
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr == ""
    assert ran.children, "the script reported no processes of its own"
    left = alive_after(ran.children, timeout=15)
    assert not left, f"processes outlived the script: {left}"


# -- a script that ends without shutdown ------------------------------------

SUBMIT_AND_END = """
if __name__ == "__main__":
    ex = EXECUTOR
    for word in ("apple", "banana", "cherry"):
        ex.submit(h.sleep_then_print, 0.5, word)
    report_children()
"""


@pytest.mark.parametrize("executor", EXECUTORS)
def test_calls_submitted_by_a_script_that_never_shuts_down_run_before_it_exits(tmp_path, executor):
    ran = run_script(write_script(tmp_path, SUBMIT_AND_END, executor))
    assert sorted(ran.lines) == ["apple", "banana", "cherry"]
    assert_clean_exit(ran)


# -- submit from an atexit handler -------------------------------------------

SUBMIT_AT_EXIT = """
def submit_at_exit():
    for name, attempt in [("submit", lambda: ex.submit(h.square, 2)),
                          ("map", lambda: ex.map(h.square, [1, 2]))]:
        try:
            attempt()
        except RuntimeError as error:
            print(f"{name}: RuntimeError: {error}", flush=True)
        else:
            print(f"{name}: accepted", flush=True)


if __name__ == "__main__":
    ex = EXECUTOR
    print(ex.submit(h.square, 3).result())
    report_children()
    atexit.register(submit_at_exit)
"""


@pytest.mark.parametrize("executor", EXECUTORS)
def test_submit_from_an_atexit_handler_raises_after_interpreter_shutdown(tmp_path, executor):
    ran = run_script(write_script(tmp_path, SUBMIT_AT_EXIT, executor))
    # ProcessPoolExecutor's exit hook shuts down each executor whose workers
    # had started, which then says "after shutdown" (only one that never
    # ran a call says "after interpreter shutdown"); CPython's own test
    # checks no more than "cannot schedule new futures". Ours always names
    # the interpreter's shutdown.
    reason = "shutdown" if executor == "ProcessPoolExecutor" else "interpreter shutdown"
    assert ran.lines == [
        "9",
        f"submit: RuntimeError: cannot schedule new futures after {reason}",
        f"map: RuntimeError: cannot schedule new futures after {reason}",
    ]
    assert_clean_exit(ran)


START_AT_EXIT = """
def start_at_exit():
    try:
        late = SulisDaskExecutor(1)
    except RuntimeError as error:
        print(f"RuntimeError: {error}", flush=True)
    else:
        print("started", flush=True)
        late.shutdown()


if __name__ == "__main__":
    ex = EXECUTOR
    print(ex.submit(h.square, 3).result())
    report_children()
    atexit.register(start_at_exit)
"""


def test_an_executor_started_from_an_atexit_handler_is_refused_at_once(tmp_path):
    """Ours only (ProcessPoolExecutor starts, then refuses every call): a
    cluster cannot be relied on to start once Python stops its thread pools,
    and would never be given work."""
    ran = run_script(write_script(tmp_path, START_AT_EXIT, "SulisDaskExecutor"))
    assert ran.lines == [
        "9", "RuntimeError: cannot start a SulisDaskExecutor after interpreter shutdown has begun"]
    assert_clean_exit(ran)


# -- shutdown(wait=False), then the end of the script ------------------------

SHUTDOWN_NOWAIT_AND_END = """
if __name__ == "__main__":
    ex = EXECUTOR
    report_children()
    ex.submit(h.sleep_then_print, 1.0, "apple")
    ex.shutdown(wait=False)
"""

#: Runs of the script at once: the hang it guards against was intermittent.
NOWAIT_RUNS = 6


def test_shutdown_without_waiting_then_exit_finishes_the_running_call(tmp_path):
    script = write_script(tmp_path, SHUTDOWN_NOWAIT_AND_END, "SulisDaskExecutor")
    procs = [start(script) for _ in range(NOWAIT_RUNS)]
    # Collected one after another while all run: each gets its own deadline.
    with concurrent.futures.ThreadPoolExecutor(NOWAIT_RUNS) as readers:
        outputs = list(readers.map(finish, procs))
    for proc, (stdout, stderr) in zip(procs, outputs):
        ran = parse(proc.returncode, stdout, stderr)
        assert ran.lines == ["apple"]
        assert_clean_exit(ran)


# -- Ctrl-C while the interpreter waits at exit ------------------------------

CTRL_C_AT_EXIT = """
if __name__ == "__main__":
    ex = EXECUTOR
    report_children()
    started, release = os.path.abspath("call.started"), os.path.abspath("call.release")
    ex.submit(h.block, started, release, "finished", 300)
    wait_until(lambda: os.path.exists(started), 60, "the call to start")
    # Registered after sulis_executor's exit hook, so it runs just before it.
    threading._register_atexit(lambda: print("EXITING", flush=True))
"""


def test_ctrl_c_while_waiting_at_exit_stops_the_wait_and_leaves_no_process(tmp_path):
    proc = start(write_script(tmp_path, CTRL_C_AT_EXIT, "SulisDaskExecutor"))
    try:
        assert proc.stdout is not None
        seen = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line or line == "EXITING\n":
                break
            seen.append(line)
        assert line == "EXITING\n", f"the script never reached its end; its output: {seen}"
        os.kill(proc.pid, signal.SIGINT)
        stdout, stderr = finish(proc, timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    ran = parse(proc.returncode, "".join(seen) + stdout, stderr)
    assert "KeyboardInterrupt" in stderr
    assert ran.lines == []  # nothing but the report of its processes
    left = alive_after(ran.children, timeout=15)
    assert ran.children and not left, f"processes outlived the script: {left}"


# -- an executor garbage collected with work still held -----------------------


@pytest.fixture(params=["ProcessPoolExecutor", "SulisDaskExecutor"])
def make_executor(request):
    def make():
        if request.param == "ProcessPoolExecutor":
            return ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver"))
        return SulisDaskExecutor(2)

    return make


def children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def started_processes(make) -> tuple[concurrent.futures.Executor, set[int]]:
    """A new executor, and the processes that end with it: every process
    ours starts; ProcessPoolExecutor's workers (multiprocessing's fork
    server serves the whole test session)."""
    before = children()
    ex = make()
    assert ex.submit(h.square, 2).result(timeout=60) == 4  # its workers are up
    if isinstance(ex, ProcessPoolExecutor):
        return ex, set(ex._processes)  # type: ignore[attr-defined]
    return ex, children() - before


def test_a_collected_executor_still_settles_the_futures_it_handed_out(make_executor):
    ex, processes = started_processes(make_executor)
    futures = [ex.submit(h.sleep_then_return, 0.3, i) for i in range(4)]
    del ex
    gc.collect()
    assert [f.result(timeout=60) for f in futures] == [0, 1, 2, 3]
    wait_until(lambda: not alive(processes), 30, "the executor's processes to exit")


@pytest.mark.parametrize("end", ["exhausted", "dropped"])
def test_a_collected_executor_still_delivers_every_map_result(make_executor, end):
    ex, processes = started_processes(make_executor)
    # Ours reads the input lazily: with one chunk in flight, the iterator
    # submits 19 more after the executor is gone. (ProcessPoolExecutor
    # submits them all at once; buffersize comes with Python 3.14.)
    window = {"buffersize": 1} if isinstance(ex, SulisDaskExecutor) else {}
    results = ex.map(h.sleep_then_return, itertools.repeat(0.02), range(20), **window)
    del ex
    gc.collect()
    if end == "exhausted":
        assert list(results) == list(range(20))
    else:
        del results  # never started: it cancels nothing, and keeps nothing open
        gc.collect()
    wait_until(lambda: not alive(processes), 30, "the executor's processes to exit")


def test_after_shutdown_a_map_iterator_still_needing_chunks_raises_even_once_collected():
    ex = SulisDaskExecutor(2)
    results = ex.map(h.square, range(10), buffersize=1)
    ex.shutdown(wait=False)
    del ex
    gc.collect()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        list(results)
