"""The fork server of local-mode workers: ``python -m sulis_executor._forkserver FD CLIENT``.

Why: on a laptop's few cores, starting a local cluster is CPU-bound, and most
of that CPU is each worker, a fresh interpreter, importing Dask (about 0.4 s
each). This process imports Dask and the worker module once, then forks every
worker on request, so the cluster pays one import instead of one per worker,
and the workers share those pages. It is itself a fresh interpreter, not a
fork of the client: the client has threads (and maybe MPI, or the user's
``__main__``), and a fork of a process with threads can inherit a lock held
by a thread that no longer exists. This one never starts a thread or an event
loop, and checks that it has none before it forks a worker: numpy's OpenBLAS
starts a thread pool when imported, and shuts it down around a fork, so the
check comes after a trial fork, and nothing here calls BLAS to restart it.

The client (:mod:`sulis_executor.launchers._forked`) writes JSON lines to our
standard input; we answer on file descriptor FD. CLIENT is the client's pid.

* ``{"fork": ARGS, "id": N}``: fork a worker running
  ``sulis_executor.worker.main(ARGS)``; answer ``{"id": N, "pid": PID}`` (or
  ``{"id": N, "error": TEXT}``).
* ``{"greet": LINE}``: the greeting (scheduler address and the like) that
  workers read on their standard input, a pipe from us: written to every
  worker waiting for it and to every later one.
* ``{"signal": SIGNUM, "pid": PID}``: signal a worker, if it has not been
  reaped (so never another process that reused its pid).
* When a worker exits, we reap it and report ``{"pid": PID, "exit": STATUS}``
  (``Popen.returncode``'s convention: negative for a signal).
* ``{"close": true}``, or the end of our input: the client is closing; we
  kill the workers left, reap them, and exit. (The end of input alone could
  be late: a process the client forked would hold our input open.)

We die with the client, and each worker with us (``PR_SET_PDEATHSIG``). Our
parent-death signal is SIGUSR1, which says for certain that the client is
dying (the client's thread that started us ends only when we have exited or
the client dies), where SIGTERM may come from anyone: on it we remove the
client's private files (``remove_when_orphaned`` in the greeting), then exit.
The workers, whose parent-death signal is SIGTERM, then exit at once, and
remove the files too if they see the client gone (see
:class:`sulis_executor.worker.Parentage`): they may not see it yet, as the
client may not have finished dying when the signal reaches them.
"""

from __future__ import annotations

import gc
import json
import os
import select
import shutil
import signal
import sys
import warnings
from collections.abc import Callable
from typing import Any

from ._signals import unblock_signals
from .worker import ProcessIdentity, _die_with_parent, process_start_time


def _import_what_workers_use() -> None:
    """Everything a worker imports before it joins, so no forked worker does;
    and the package versions it tells the scheduler, which Dask caches."""
    import asyncio  # noqa: F401
    import importlib
    import secrets  # noqa: F401
    import shutil  # noqa: F401

    import dask.config
    import distributed  # noqa: F401
    import tornado.platform.asyncio  # noqa: F401
    from distributed import Worker  # noqa: F401
    from distributed.security import Security  # noqa: F401
    from distributed.utils import get_ip_interface  # noqa: F401
    from distributed.versions import get_versions

    from . import _quiet, _remote, _security  # noqa: F401

    for module in dask.config.get("distributed.worker.http.routes", []):
        importlib.import_module(module)
    get_versions()


def _threads() -> int:
    """Threads of this process, native ones (e.g. a BLAS pool) included."""
    return len(os.listdir("/proc/self/task"))


def _fork() -> int:
    with warnings.catch_warnings():
        # Python 3.12+ warns when a process with threads forks. The trial
        # fork may be such a fork (see the module's docstring); the others
        # are checked not to be.
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def _single_threaded_after_a_fork() -> bool:
    pid = _fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return _threads() == 1


#: Our parent-death signal: see the module's docstring.
CLIENT_DIED = signal.SIGUSR1


def _ignore(signum: int, frame: Any) -> None:
    """SIGCHLD's handler: the signal only wakes the loop (``set_wakeup_fd``)."""


class _Server:
    def __init__(self, control: int, report: int, client: ProcessIdentity,
                 default_handlers: dict[signal.Signals, Any]) -> None:
        self.pid = os.getpid()
        self.control = control
        self.report = report
        self.client = client
        self.greeting: bytes | None = None
        self.remove_when_orphaned: list[str] = []
        #: Workers not yet reaped -> the write end of the pipe that brings
        #: their greeting, until it is sent.
        self.children: dict[int, int | None] = {}
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_read, False)
        os.set_blocking(self.wake_write, False)
        self.default_handlers = default_handlers
        signal.set_wakeup_fd(self.wake_write)
        signal.signal(signal.SIGCHLD, _ignore)
        signal.signal(CLIENT_DIED, self._client_died)

    def serve(self) -> Callable[[], int] | None:
        """Serve until the client closes; in a forked worker, return what it runs."""
        pending = b""
        while True:
            ready, _, _ = select.select([self.control, self.wake_read], [], [])
            if self.wake_read in ready:
                while _read_nonblocking(self.wake_read):
                    pass
                self._reap()
            if self.control in ready:
                data = os.read(self.control, 65536)
                if not data:
                    self._shut_down()
                    return None
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    request = json.loads(line)
                    if "close" in request:
                        self._shut_down()
                        return None
                    worker = self._handle(request)
                    if worker is not None:
                        return worker

    def _handle(self, request: dict[str, Any]) -> Callable[[], int] | None:
        if "fork" in request:
            return self._fork_worker(request["fork"], request["id"])
        if "greet" in request:
            self.greeting = request["greet"].encode()
            self.remove_when_orphaned = json.loads(self.greeting).get("remove_when_orphaned") or []
            for pid, pipe in list(self.children.items()):
                if pipe is not None:
                    self._send_greeting(pipe)
                    self.children[pid] = None
        elif "signal" in request:
            if request["pid"] in self.children:  # not reaped: still ours
                try:
                    os.kill(request["pid"], request["signal"])
                except OSError:
                    pass
        return None

    def _send_greeting(self, pipe: int) -> None:
        try:  # one short line: a pipe takes it without blocking
            os.write(pipe, self.greeting or b"")
        except OSError:  # the worker is gone; we reap it and say so
            pass
        os.close(pipe)

    def _fork_worker(self, args: list[str], request_id: int) -> Callable[[], int] | None:
        read, write = os.pipe()
        try:
            pid = _fork()
        except OSError as error:
            os.close(read)
            os.close(write)
            self._report({"id": request_id, "error": str(error)})
            return None
        if pid == 0:
            return self._become_worker(read, write, args)
        os.close(read)
        self.children[pid] = write
        if self.greeting is not None:
            self._send_greeting(write)
            self.children[pid] = None
        self._report({"id": request_id, "pid": pid})
        return None

    def _become_worker(self, read: int, write: int, args: list[str]) -> Callable[[], int]:
        """In the forked child: shed the server's state, then return what runs
        the worker (run after ``serve()`` returns, so the worker ends as a
        fresh interpreter does: atexit handlers, flushed output)."""
        try:
            # A fork does not inherit it; the server may have died before we asked.
            if not _die_with_parent(parent=self.pid):
                os._exit(0)
            signal.set_wakeup_fd(-1)
            for signum, handler in self.default_handlers.items():
                signal.signal(signum, handler)
            # Standard input brings the greeting, as to a worker started
            # with a pipe; nothing of the server's stays open.
            os.dup2(read, 0)
            for fd in (read, write, self.control, self.report, self.wake_read, self.wake_write,
                       *(pipe for pipe in self.children.values() if pipe is not None)):
                os.close(fd)
            # random reseeds itself after a fork; numpy's global generator
            # does not, and every worker would draw the same numbers.
            numpy = sys.modules.get("numpy")
            if numpy is not None:
                numpy.random.seed()
        except BaseException as error:  # noqa: BLE001 - one line, not a traceback
            print(f"sulis_executor fork server: a worker failed to start: {error!r}",
                  file=sys.stderr, flush=True)
            os._exit(1)
        from . import worker

        sys.argv = [worker.__file__, *args]
        client = self.client
        return lambda: worker.main(args, die_with_parent=False, client=client)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            pipe = self.children.pop(pid, None)
            if pipe is not None:
                os.close(pipe)
            self._report({"pid": pid, "exit": os.waitstatus_to_exitcode(status)})

    def _shut_down(self) -> None:
        """The client is closing: it has stopped its workers already; any left
        (one forked as it closed) are killed, so none outlives us."""
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in list(self.children):
            _, status = os.waitpid(pid, 0)
            self._report({"pid": pid, "exit": os.waitstatus_to_exitcode(status)})
        self.children.clear()

    def _client_died(self, signum: int, frame: Any) -> None:
        """Remove the client's private files, which it cannot any more, and
        exit; our workers follow. (Run between two steps of the loop, never
        in a worker: they restore the default handler.)"""
        for path in self.remove_when_orphaned:
            shutil.rmtree(path, ignore_errors=True)
        os._exit(0)

    def _report(self, message: dict[str, Any]) -> None:
        try:  # one short line: written whole
            os.write(self.report, json.dumps(message).encode() + b"\n")
        except OSError:  # the client is gone; so will we be
            pass


def _read_nonblocking(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""


def main(argv: list[str]) -> int:
    report, client_pid = int(argv[0]), int(argv[1])
    # Started by a thread of the client's that leaves signals to its main
    # thread (see _signals): take them, our parent-death signal first.
    unblock_signals()
    # What forked workers restore: Python's own settings, as a fresh
    # interpreter has them.
    default_handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGCHLD, CLIENT_DIED)}
    # Ctrl-C reaches the whole foreground process group; the client decides
    # what becomes of its workers, and so of us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Until we serve, the signal's default action (exit) will do: we know
    # of no files to remove.
    client_alive = _die_with_parent(CLIENT_DIED, parent=client_pid)
    client_start = process_start_time(client_pid)
    if not client_alive or client_start is None:
        return 0  # the client died before we could follow it
    control = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    try:
        _import_what_workers_use()
        if not _single_threaded_after_a_fork():
            raise RuntimeError(f"{_threads()} threads after importing Dask; forking is unsafe")
    except Exception as error:  # the client starts its workers as fresh interpreters
        os.write(report, json.dumps({"error": f"{type(error).__name__}: {error}"}).encode() + b"\n")
        return 1
    # Keep the imported objects out of the workers' garbage collections,
    # which would otherwise write to (and so copy) every page holding them.
    # (Not collected first: that took 20-50 ms here, before the first fork.)
    gc.freeze()
    worker = _Server(control, report, (client_pid, client_start), default_handlers).serve()
    return 0 if worker is None else worker()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # as the worker module does
    sys.exit(main(sys.argv[1:]))
