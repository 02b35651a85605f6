"""Worker processes started as commands, and kept alive until closed.

Shared by the launchers that start workers themselves. Each slot runs one
command; when its process dies while the cluster is open (killed, or
crashed by a task), a fresh one takes its place, as a Dask nanny would. A
slot that keeps dying straight after start is given up, so a worker that
cannot start does not spin forever.

Workers may start before the scheduler exists: a worker started with ``-``
for its scheduler imports Dask (most of its start-up time) and then reads
the scheduler's address from its standard input, which :meth:`greet`
writes to every worker once the scheduler is up.
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
from typing import Any

logger = logging.getLogger("sulis_executor")

#: A slot whose worker failed to start (exit status 1 or 2: an error before
#: or while joining the scheduler) this many times, each within QUICK_DEATH
#: seconds of starting, is given up. Workers killed by a signal or by a task
#: (os._exit, a segfault) are always replaced: that is a task's fault, and
#: Dask fails such a task after a few tries.
MAX_QUICK_DEATHS = 5
QUICK_DEATH = 5.0
STARTUP_FAILURE_CODES = (1, 2)


def worker_command(scheduler: str, name: str, extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "sulis_executor.worker", scheduler, "--name", name, *extra]


class WorkerProcesses:
    """Run ``command_for(slot, generation)`` in each slot, restarting on death."""

    def __init__(self, slots: int, command_for: Callable[[int, int], list[str]],
                 env: dict[str, str] | None = None) -> None:
        self._command_for = command_for
        self._env = env
        self._greeting: bytes | None = None
        self._lock = threading.Lock()
        self._closing = False
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * slots
        self._threads = [
            threading.Thread(target=self._supervise, args=(slot,), daemon=True,
                             name=f"sulis-executor-worker-{slot}")
            for slot in range(slots)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self._procs if p is not None and p.poll() is None]

    def _spawn(self, slot: int, generation: int) -> subprocess.Popen[bytes] | None:
        with self._lock:
            if self._closing:
                return None
            # Output is inherited: what tasks print is the user's output, as
            # with ProcessPoolExecutor. Dask's logs are silenced in the worker.
            # Standard input carries the greeting, then ends.
            proc = subprocess.Popen(
                self._command_for(slot, generation), stdin=subprocess.PIPE, env=self._env
            )
            self._procs[slot] = proc
            if self._greeting is not None:
                self._send_greeting(proc)
            return proc

    def greet(self, settings: dict[str, Any]) -> None:
        """Tell every worker, now and later, what it waits for on its
        standard input: the scheduler address and the like, as JSON."""
        with self._lock:
            self._greeting = json.dumps(settings).encode() + b"\n"
            for proc in self._procs:
                if proc is not None:
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

    def close(self, timeout: float) -> None:
        """SIGTERM every worker, then SIGKILL what is left after ``timeout``."""
        with self._lock:
            self._closing = True
            procs = [p for p in self._procs if p is not None]
            for proc in procs:
                if proc.stdin is not None and not proc.stdin.closed:
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
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
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
