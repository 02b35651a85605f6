"""The client's side of the fork server (:mod:`sulis_executor._forkserver`).

:class:`ForkServer` starts the server, asks it for workers and follows their
exits; :class:`ForkedWorker` is a worker's handle, with the part of
``subprocess.Popen``'s interface that :class:`._processes.WorkerProcesses`
uses, so it supervises forked workers as it does started ones.

The server is started from a thread of its own, which then reads its reports
until it exits: ``PR_SET_PDEATHSIG`` fires when the *thread* that started a
process ends, so that thread must live as long as the server does. The
server takes that signal to mean the client is dying, and removes the
client's files: the thread never ends while the server runs, even on an
error (it kills the server first).

Signals go through the server, the workers' parent: it signals a worker only
if it has not reaped it, so never a process that took a dead worker's pid.
If the server dies, its workers die with it; their handles then report
``-SIGTERM`` (what their parent-death signal is), and :meth:`ForkServer.fork`
returns ``None`` from then on, for the caller to start workers another way.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any

from .._signals import leave_signals_to_main_thread

logger = logging.getLogger("sulis_executor")


def fork_server_supported() -> bool:
    """The fork server needs ``fork`` and Linux's ``PR_SET_PDEATHSIG``."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


class ForkedWorker:
    """A worker forked by a :class:`ForkServer`, handled like a ``Popen``."""

    def __init__(self, server: ForkServer, pid: int, args: list[str]) -> None:
        self.pid = pid
        self.args = args
        self.returncode: int | None = None
        self._server = server
        self._exited = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            self._server.signal(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _set_exited(self, returncode: int) -> None:
        if self.returncode is None:
            self.returncode = returncode
            self._exited.set()


class _Request:
    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.worker: ForkedWorker | None = None
        self.answered = threading.Event()


class ForkServer:
    """Start a fork server; fork workers from it; stop it."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self._env = env
        self._lock = threading.Lock()  # everything below, and writes to the server
        self._proc: subprocess.Popen[bytes] | None = None
        self._running = False
        self._closing = False
        self._next_id = 0
        self._requests: dict[int, _Request] = {}
        self._workers: dict[int, ForkedWorker] = {}
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="sulis-executor-fork-server")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the server process (it then imports Dask; requests wait for that)."""
        with leave_signals_to_main_thread():
            self._thread.start()
        self._started.wait()

    def fork(self, args: list[str]) -> ForkedWorker | None:
        """A new worker running ``python -m sulis_executor.worker ARGS``, or
        ``None`` if this server cannot fork any (it failed or died)."""
        request = _Request(args)
        with self._lock:
            request_id, self._next_id = self._next_id, self._next_id + 1
            self._requests[request_id] = request
            if not self._send({"fork": args, "id": request_id}):
                del self._requests[request_id]
                return None
        # The first requests wait for the server's import of Dask.
        request.answered.wait()
        return request.worker

    def greet(self, greeting: bytes) -> None:
        """Hand every worker, now and later, this line on its standard input."""
        with self._lock:
            self._send({"greet": greeting.decode()})

    def signal(self, pid: int, sig: int) -> None:
        with self._lock:
            self._send({"signal": int(sig), "pid": pid})

    def close(self, timeout: float) -> None:
        """Stop the server once its workers are stopped: it kills any left
        (one forked while closing), reaps them, and exits."""
        with self._lock:
            self._send({"close": True})
            self._closing = True
            proc = self._proc
            if proc is not None and proc.stdin is not None:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _send(self, message: dict[str, Any]) -> bool:
        """Write one request (under ``self._lock``); ``False`` if the server is gone."""
        if not self._running or self._proc is None or self._proc.stdin is None:
            return False
        try:
            self._proc.stdin.write(json.dumps(message).encode() + b"\n")
            self._proc.stdin.flush()
            return True
        except (OSError, ValueError):  # gone, or closed by close()
            return False

    def _run(self) -> None:
        report_read, report_write = os.pipe()
        try:
            with self._lock:
                if not self._closing:
                    # Output is inherited, for the workers: what tasks print is
                    # the user's output. The server itself prints nothing.
                    self._proc = subprocess.Popen(
                        [sys.executable, "-m", "sulis_executor._forkserver",
                         str(report_write), str(os.getpid())],
                        stdin=subprocess.PIPE, env=self._env, pass_fds=(report_write,),
                    )
                    self._running = True
        except OSError as error:
            logger.info("could not start the workers' fork server: %s", error)
        finally:
            os.close(report_write)
            self._started.set()
        try:
            with open(report_read, "rb") as reports:
                if self._proc is not None:
                    for line in reports:
                        self._dispatch(json.loads(line))
        except BaseException:
            logger.exception("the workers' fork server could not be followed; stopping it")
            if self._proc is not None:
                self._proc.kill()
        self._ended()

    def _dispatch(self, report: dict[str, Any]) -> None:
        with self._lock:
            if "exit" in report:
                worker = self._workers.pop(report["pid"], None)
                if worker is not None:
                    worker._set_exited(report["exit"])
            elif "id" in report:
                request = self._requests.pop(report["id"])
                if "pid" in report:
                    request.worker = ForkedWorker(self, report["pid"], request.args)
                    self._workers[report["pid"]] = request.worker
                else:
                    logger.info("the workers' fork server could not fork: %s", report["error"])
                request.answered.set()
            elif "error" in report:
                logger.info("the workers' fork server cannot fork: %s", report["error"])

    def _ended(self) -> None:
        """The server exited: no more forks; its workers died with it."""
        returncode = self._proc.wait() if self._proc is not None else None
        with self._lock:
            self._running = False
            if not self._closing:
                logger.info("the workers' fork server exited (status %s)", returncode)
            for request in self._requests.values():
                request.answered.set()
            self._requests.clear()
            for worker in self._workers.values():
                worker._set_exited(-signal.SIGTERM)
            self._workers.clear()
