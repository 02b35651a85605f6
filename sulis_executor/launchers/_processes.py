"""Worker processes on this machine, kept alive until closed.

Each slot runs one worker, ``python -m sulis_executor.worker ARGS``; when
its process dies while the cluster is open (killed, or crashed by a task),
a fresh one takes its place, as a Dask nanny would. A slot that keeps dying
straight after start is given up, so a worker that cannot start does not
spin forever.

On Linux, workers are forked from a fork server (:mod:`._forked`), which
imports Dask once for them all: importing it is most of a worker's start-up
time, and on a laptop's few cores the workers' imports would share them.
Where there is no fork server (not Linux), or it fails or dies, workers are
started as fresh interpreters instead.

Workers may start before the scheduler exists: a worker started with ``-``
for its scheduler imports Dask (or is forked with it imported) and then
reads the scheduler's address from its standard input, which :meth:`greet`
writes to every worker once the scheduler is up (for forked workers, the
fork server does).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .._signals import leave_signals_to_main_thread
from ._forked import ForkServer, fork_server_supported

logger = logging.getLogger("sulis_executor")

#: A slot whose worker failed to start (exit status 1 or 2: an error before
#: or while joining the scheduler) this many times, each within QUICK_DEATH
#: seconds of starting, is given up. Workers killed by a signal or by a task
#: (os._exit, a segfault) are always replaced: that is a task's fault, and
#: Dask fails such a task after a few tries.
MAX_QUICK_DEATHS = 5
QUICK_DEATH = 5.0
STARTUP_FAILURE_CODES = (1, 2)
#: Seconds that workers sent a signal by ``signal_all`` (terminate_workers)
#: have to exit before ``close`` kills them.
SIGNALLED_GRACE = 1.0


def worker_args(scheduler: str, name: str, extra: Sequence[str] = ()) -> list[str]:
    """Arguments of ``python -m sulis_executor.worker``."""
    return [scheduler, "--name", name, *extra]


class WorkerProcess(Protocol):
    """What :class:`WorkerProcesses` uses of a worker process: ``Popen``'s
    interface, which forked workers' handles have too."""

    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


class WorkerProcesses:
    """Run a worker with ``args_for(slot, generation)`` in each slot,
    restarting it on death; fork them if ``fork`` and this system can."""

    def __init__(self, slots: int, args_for: Callable[[int, int], list[str]],
                 env: dict[str, str] | None = None, fork: bool = True) -> None:
        self._args_for = args_for
        self._env = env
        self._server = ForkServer(env) if fork and fork_server_supported() else None
        self._greeting: bytes | None = None
        self._lock = threading.Lock()
        self._closing = False
        self._signalled = False
        self._procs: list[WorkerProcess | None] = [None] * slots
        self._threads = [
            threading.Thread(target=self._supervise, args=(slot,), daemon=True,
                             name=f"sulis-executor-worker-{slot}")
            for slot in range(slots)
        ]

    def start(self) -> None:
        if self._server is not None:
            self._server.start()
        with leave_signals_to_main_thread():
            for thread in self._threads:
                thread.start()

    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self._procs if p is not None and p.poll() is None]

    def _spawn(self, slot: int, generation: int) -> WorkerProcess | None:
        args = self._args_for(slot, generation)
        with self._lock:
            if self._closing:
                return None
        # Not under the lock: the first forks wait for the server's import.
        proc: WorkerProcess | None = self._server.fork(args) if self._server is not None else None
        with self._lock:
            if self._closing:
                if proc is not None:
                    proc.kill()  # or the closing fork server does
                return None
            if proc is None:
                # Output is inherited: what tasks print is the user's output,
                # as with ProcessPoolExecutor. Dask's logs are silenced in the
                # worker. Standard input carries the greeting, then ends.
                popen = subprocess.Popen(
                    [sys.executable, "-m", "sulis_executor.worker", f"--parent-pid={os.getpid()}", *args],
                    stdin=subprocess.PIPE, env=self._env,
                )
                if self._greeting is not None:
                    self._send_greeting(popen)
                proc = popen
            self._procs[slot] = proc
            return proc

    def greet(self, settings: dict[str, Any]) -> None:
        """Tell every worker, now and later, what it waits for on its
        standard input: the scheduler address and the like, as JSON."""
        with self._lock:
            self._greeting = json.dumps(settings).encode() + b"\n"
            if self._server is not None:
                self._server.greet(self._greeting)
            for proc in self._procs:
                if isinstance(proc, subprocess.Popen):
                    self._send_greeting(proc)

    def _send_greeting(self, proc: subprocess.Popen[bytes]) -> None:
        stdin = proc.stdin
        if stdin is None or stdin.closed or self._greeting is None:
            return
        try:  # one short line: a pipe takes it without blocking
            stdin.write(self._greeting)
            stdin.close()
        except OSError:  # the worker is gone already; its supervisor sees to it
            pass

    def _supervise(self, slot: int) -> None:
        quick_deaths = 0
        for generation in range(1_000_000):
            started = time.monotonic()
            proc = self._spawn(slot, generation)
            if proc is None:
                return
            returncode = proc.wait()
            with self._lock:
                if self._closing:
                    return
            quick = time.monotonic() - started < QUICK_DEATH
            quick_deaths = quick_deaths + 1 if quick and returncode in STARTUP_FAILURE_CODES else 0
            if quick_deaths >= MAX_QUICK_DEATHS:
                logger.error("worker slot %d died %d times right after starting (exit %s); "
                             "not restarting it", slot, quick_deaths, returncode)
                return
            logger.info("worker in slot %d exited with %s; starting a new one", slot, returncode)

    def signal_all(self, signum: int) -> None:
        """Send ``signum`` to every live worker, and start no new ones.
        ``close`` then gives them only ``SIGNALLED_GRACE`` seconds: a worker
        closes cleanly on SIGTERM, but only once its running task ends."""
        with self._lock:
            self._closing = True
            self._signalled = True
            procs = [p for p in self._procs if p is not None and p.poll() is None]
        for proc in procs:
            try:
                proc.send_signal(signum)
            except OSError:  # exited since
                pass

    def close(self, timeout: float) -> None:
        """SIGTERM every worker, then SIGKILL what is left after ``timeout``."""
        with self._lock:
            self._closing = True
            procs = [p for p in self._procs if p is not None]
            for proc in procs:
                if isinstance(proc, subprocess.Popen) and proc.stdin is not None \
                        and not proc.stdin.closed:
                    # A worker still waiting for its greeting reads the end
                    # of its input and exits.
                    try:
                        proc.stdin.close()
                    except OSError:
                        pass
        for proc in procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except OSError:
                    pass
        deadline = time.monotonic() + (min(timeout, SIGNALLED_GRACE) if self._signalled else timeout)
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._server is not None:
            self._server.close(timeout=max(1.0, deadline - time.monotonic()))
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(1.0)


def pythonpath_env() -> dict[str, str]:
    """The environment for worker commands: ours, with our ``sys.path`` first
    entry kept, so a package imported from the current directory (as in
    ``python script.py``) is importable in the workers too."""
    env = dict(os.environ)
    here = os.getcwd()
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if here not in paths:
        paths.append(here)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env
