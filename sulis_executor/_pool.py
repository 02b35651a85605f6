"""A node's pool: the processes that run calls, and the agent that feeds them.

Why. A Dask worker per CPU costs, per process, an import of Dask, a worker
start (a TLS connection, registration), and, idle, heartbeats and monitors;
and every batch handed to it crosses two event loops and a thread. At 128
workers a node that was most of the machine's time (see docs/scaling.rst).
So a node runs one Dask worker, the **agent**, and the calls run in plain
**members**: processes with no event loop and no connection to anything
but the agent, forked after the imports, that wait on a socket for a batch,
run it, and answer with its result. Idle, a member costs nothing.

The agent holds a :class:`Pool`: members connect to it on a Unix socket in
a private directory (``serve``), and one thread of the agent's moves every
message between them and the agent (``Pool._loop``). Work waits in the
pool's queue, oldest first, for a free member: batches the executor hands
out (the agent's stream handler puts them, see ``_agent``), and the Dask
tasks that carry the executor's own batches when they hold Dask data (those
annotated with :data:`~._agent.POOL_EXECUTOR`, run by :class:`PoolExecutor`).
Other Dask tasks (Dask collections, joblib, ``ex.client``) run in the
agent's threads, as on any Dask worker.

A member that dies (a segfault, ``os._exit``, the out-of-memory killer)
loses what it held: the pool says so (``lost``), so that the executor runs
the batch again elsewhere; a Dask task goes back to the front of the pool's
queue, up to Dask's ``allowed-failures`` times, as Dask retries the task of a
worker that died, then fails with :class:`MemberDiedError`. Whoever started the member (a fork server)
starts another, which joins the pool when it connects.

Messages are pickled tuples on ``multiprocessing.connection.Connection``
(length-prefixed frames):

* agent to member: ``("batch", key, kind, payload, shared, has_initializer,
  initializer)``, ``("call", key, pickled (fn, args, kwargs), initializer)``,
  where ``initializer`` is ``pickle((fn, args))`` with a member's first
  item once the executor's initializer has reached the agent, else ``None``;
* member to agent: ``("hello", pid)``, ``("done", key, result, leaving)``,
  ``("called", key, ok, pickled value, leaving)``, where ``leaving`` says
  that the member exits next (``max_tasks`` reached).
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from multiprocessing.connection import Connection, wait
from typing import Any, NoReturn

from .errors import WorkerDiedError

logger = logging.getLogger("sulis_executor")

#: How long a new member keeps trying to reach its agent, which may still be
#: starting (both are forked at about the same moment).
CONNECT_TIMEOUT = 60.0

#: What the agent is told by its pool: ``("joined" | "left", members)``,
#: ``("done", key, result)``, ``("lost", key)`` (its member died running it).
Event = tuple[Any, ...]


# -- the member ---------------------------------------------------------------


def _connect(path: str, timeout: float) -> Connection:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return Connection(sock.detach())
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


class MemberWorker:
    """What ``distributed.get_worker()`` gives a call in a member: enough of
    a Dask worker for ``distributed.worker_client()`` and ``get_client()``
    (a client of the cluster's scheduler, made on first use) and
    ``get_current_task()`` (the batch's key, or the Dask task's)."""

    def __init__(self, scheduler: str, security: Callable[[], Any]) -> None:
        import types

        self.scheduler = types.SimpleNamespace(address=scheduler)
        self.data: dict[str, Any] = {}  # no Dask data is held here (Client.gather looks)
        self._security = security
        self._client: Any = None
        self.key: str | None = None

    def get_current_task(self) -> str | None:
        return self.key

    def log_event(self, topic: Any, msg: Any) -> None:
        pass  # a Dask worker's event log, which members do not keep

    def _get_client(self, timeout: float | None = None) -> Any:
        if self._client is None:
            from distributed import Client

            self._client = Client(self.scheduler.address, security=self._security(),
                                  timeout=timeout, set_as_default=False)
        return self._client

    def install(self) -> bool:
        """Be what ``get_worker()`` returns here, once Dask is imported
        (members that are fresh interpreters never need it otherwise)."""
        if "distributed.worker" not in sys.modules:
            return False
        from . import _dask_private

        return _dask_private.set_current_worker(self)


def serve(path: str, token: str, max_tasks: int | None = None,
          cluster: MemberWorker | None = None) -> int:
    """Run as a member of the pool listening at ``path``: take batches and
    calls one at a time until the agent hangs up (then exit 0), or, with
    ``max_tasks``, until that many have run (the pool's starter replaces
    us, as ``max_tasks_per_child`` asks). ``cluster`` is what calls see of
    the cluster through ``distributed.get_worker()``."""
    from . import _remote

    _remote.become_member()
    installed = cluster is None or cluster.install()
    try:
        conn = _connect(path, CONNECT_TIMEOUT)
    except OSError as error:
        raise RuntimeError(f"could not join the pool at {path}: {error}") from None
    conn.send(("hello", os.getpid()))
    left = max_tasks
    while left is None or left > 0:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return 0  # the agent is closing, or gone
        except KeyboardInterrupt:
            # A terminal's Ctrl-C reaches every process of the job: the
            # script reports it; a member waiting for work just leaves.
            return 0
        if message[-1] is not None:
            _remote.set_member_initializer(*pickle.loads(message[-1]))
        if not installed:
            installed = cluster.install()  # type: ignore[union-attr]
        if message[0] == "batch":
            _, key, kind, payload, shared, has_initializer, _ = message
            if cluster is not None:
                cluster.key = key
            result = _remote.run_batch_here(kind, payload, token, has_initializer, shared)
            reply: tuple[Any, ...] = ("done", key, result)
        else:
            _, key, call, _ = message
            reply = ("called", key, *_call(call, cluster))
        # Whether this is our last: the pool must not hand us another, which
        # would be lost with us and count as a death against it.
        reply += (left == 1,)
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return 0
        if left is not None:
            left -= 1
    conn.close()
    return RETIRED


def end_member_process(status: int) -> NoReturn:
    """End a member process as ``multiprocessing`` ends ``ProcessPoolExecutor``'s
    workers: wait for the threads calls started, run ``multiprocessing``'s
    finalizers, flush the standard streams, and exit without the rest of the
    interpreter's teardown (nor ``atexit`` handlers, which such workers do
    not run either). The teardown of a process that imported Dask cost
    about 0.1 CPU-s: 128 members on a node took seconds to end."""
    import multiprocessing.util

    try:
        threading._shutdown()  # type: ignore[attr-defined]
        multiprocessing.util._exit_function()  # type: ignore[attr-defined]
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - closed, or a broken pipe: nothing to flush to
                pass
        os._exit(status)


def _call(call: bytes, cluster: MemberWorker | None) -> tuple[bool, bytes]:
    """Run a Dask task's function (``distributed.worker._run_task_simple``,
    given the task): ``(True, pickled value)`` or ``(False, pickled
    exception)``."""
    import cloudpickle

    try:
        fn, args, kwargs = cloudpickle.loads(call)
        if cluster is not None and args:
            cluster.key = getattr(args[0], "key", None)
            cluster.install()
        value: Any = fn(*args, **kwargs)
        ok = True
    except BaseException as error:  # noqa: BLE001 - it travels back to the task
        # Dask lets SystemExit and KeyboardInterrupt through to end the worker:
        # here they end the task only.
        value, ok = error if isinstance(error, Exception) else RuntimeError(repr(error)), False
    try:
        return ok, cloudpickle.dumps(value)
    except BaseException as error:  # noqa: BLE001
        from .errors import UnpicklableError

        failure = UnpicklableError(f"the result of a Dask task could not be pickled: {error!r}")
        return False, cloudpickle.dumps(failure)


# -- the agent's side ------------------------------------------------------------


class _Member:
    __slots__ = ("conn", "pid", "item", "initialized")

    def __init__(self, conn: Connection, pid: int) -> None:
        self.conn = conn
        self.pid = pid
        self.item: _Item | None = None
        self.initialized = False


class _Item:
    """Work waiting for a member: a batch (``future`` is ``None``) or a Dask task."""

    __slots__ = ("key", "message", "future", "deaths")

    def __init__(self, key: str, message: tuple[Any, ...], future: Future[Any] | None = None) -> None:
        self.key = key
        self.message = message
        self.future = future
        self.deaths = 0  # members that died running it (Dask tasks only)


#: A member's exit status once it has run its ``max_tasks``: whoever started
#: it starts another. A member whose agent hung up exits 0, and is not
#: replaced (the node is closing: a new one would wait for a pool that is
#: gone); one that dies otherwise is.
RETIRED = 75


class MemberDiedError(WorkerDiedError):
    """A Dask task's member process died every time the pool ran it (or the
    pool closed first)."""


def allowed_failures() -> int:
    """Dask's ``distributed.scheduler.allowed-failures``: deaths a task may
    cause before it fails (the same bound for batches and Dask tasks)."""
    import dask.config

    return int(dask.config.get("distributed.scheduler.allowed-failures", 3))


class Pool:
    """The members of a node's pool, as the agent sees them (see the
    module's docstring). ``events`` is called, from the pool's thread, with
    what the agent must pass on (see :data:`Event`)."""

    def __init__(self, path: str, events: Callable[[Event], None]) -> None:
        self.path = path
        self._events = events
        self._lock = threading.Lock()
        self._waiting: collections.deque[_Item] = collections.deque()
        self._members: dict[int, _Member] = {}  # by connection fd
        self._idle: collections.deque[_Member] = collections.deque()
        self._initializer: bytes | None = None
        self._closed = False
        self._calls = 0
        # The thread waits on the members, the listening socket and this pipe.
        # Any thread may write to it until the pool's thread closes it on its
        # way out; the lock keeps a write from meeting a closed (or, worse,
        # reused) descriptor.
        self._wake_lock = threading.Lock()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._wake_open = True
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self._listener.bind(path)
        self._listener.listen(1024)
        self._listener.setblocking(False)
        self._thread = threading.Thread(target=self._loop, name="sulis-executor-pool", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- what the agent asks -------------------------------------------------

    @property
    def size(self) -> int:
        """Members connected now."""
        return len(self._members)

    def set_initializer(self, initializer: bytes) -> None:
        """``pickle((fn, args))``, the executor's initializer: each member
        is given it with its first item, and runs it before its first batch."""
        self._initializer = initializer

    def put_batch(self, key: str, kind: str, payload: Any, shared: tuple[Any, ...],
                  has_initializer: bool) -> None:
        self._put(_Item(key, ("batch", key, kind, payload, tuple(shared), has_initializer)))

    def put_call(self, call: bytes) -> Future[Any]:
        """Run a Dask task's pickled ``(fn, args, kwargs)`` in a member."""
        future: Future[Any] = Future()
        with self._lock:
            self._calls += 1
            key = f"call-{self._calls}"
        self._put(_Item(key, ("call", key, call), future))
        return future

    def take_back(self) -> list[str]:
        """Withdraw the batches no member has started: their keys."""
        with self._lock:
            batches = [item for item in self._waiting if item.future is None]
            self._waiting = collections.deque(item for item in self._waiting if item.future is not None)
        return [item.key for item in batches]

    def close(self) -> None:
        """Hang up on every member (each then exits) and stop the thread."""
        with self._lock:
            self._closed = True
            calls = [item for item in self._waiting if item.future is not None]
            self._waiting.clear()
        for item in calls:
            item.future.set_exception(MemberDiedError("the pool closed before the task ran"))  # type: ignore[union-attr]
        self._wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)

    # -- the pool's thread -----------------------------------------------------

    def _put(self, item: _Item) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the pool is closed")
            self._waiting.append(item)
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if not self._wake_open:  # the thread has ended: nothing to wake
                return
            try:
                os.write(self._wake_write, b"x")
            except BlockingIOError:  # woken already
                pass

    def _loop(self) -> None:
        try:
            while not self._closed:
                ready = wait([self._listener, self._wake_read, *[m.conn for m in self._members.values()]])
                for source in ready:
                    if source is self._listener:
                        self._accept()
                    elif source == self._wake_read:
                        os.read(self._wake_read, 4096)
                    else:
                        self._receive(self._members[source.fileno()])  # type: ignore[union-attr]
                self._dispatch()
        except Exception:  # never silently: every batch would wait for ever
            logger.exception("sulis_executor: the pool's thread failed")
        finally:
            self._shut_down()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(True)
            conn = Connection(sock.detach())
            try:
                _, pid = conn.recv()
            except (EOFError, OSError):
                conn.close()
                continue
            member = _Member(conn, pid)
            self._members[conn.fileno()] = member
            self._idle.append(member)
            self._events(("joined", len(self._members)))

    def _receive(self, member: _Member) -> None:
        try:
            message = member.conn.recv()
        except (EOFError, OSError):
            self._remove(member)
            return
        item, member.item = member.item, None
        *message, leaving = message
        if not leaving:  # a member leaving (max_tasks) hangs up next: see _remove
            self._idle.append(member)
        if item is None:
            return
        if message[0] == "done":
            self._events(("done", item.key, message[2]))
        else:
            _, _, ok, value = message
            self._settle_call(item, ok, value)

    @staticmethod
    def _settle_call(item: _Item, ok: bool, value: bytes) -> None:
        import cloudpickle

        assert item.future is not None
        try:
            outcome = cloudpickle.loads(value)
        except BaseException as error:  # noqa: BLE001
            ok, outcome = False, error
        if ok:
            item.future.set_result(outcome)
        else:
            item.future.set_exception(outcome)

    def _remove(self, member: _Member) -> None:
        """A member hung up: it exited (done with its tasks) or died."""
        del self._members[member.conn.fileno()]
        member.conn.close()
        try:
            self._idle.remove(member)
        except ValueError:
            pass
        item = member.item
        if item is not None:
            if item.future is not None:
                item.deaths += 1
                if item.deaths <= allowed_failures():
                    with self._lock:
                        self._waiting.appendleft(item)
                else:
                    item.future.set_exception(MemberDiedError(
                        f"the process running this task died {item.deaths} times "
                        f"(last: pid {member.pid}); distributed.scheduler.allowed-failures "
                        f"is {allowed_failures()}"))
            else:
                self._events(("lost", item.key))
        self._events(("left", len(self._members)))

    def _dispatch(self) -> None:
        """Give waiting work to idle members, oldest first."""
        while self._idle:
            with self._lock:
                if not self._waiting:
                    return
                item = self._waiting.popleft()
            member = self._idle.popleft()
            initializer = None
            if self._initializer is not None and not member.initialized:
                initializer, member.initialized = self._initializer, True
            message = (*item.message, initializer)
            member.item = item
            try:
                member.conn.send(message)
            except (EOFError, OSError):
                self._remove(member)

    def _shut_down(self) -> None:
        for member in list(self._members.values()):
            try:
                member.conn.close()
            except OSError:
                pass
        self._members.clear()
        self._idle.clear()
        self._listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
        with self._wake_lock:
            self._wake_open = False
            os.close(self._wake_read)
            os.close(self._wake_write)


class PoolExecutor(Executor):
    """The agent's executor for Dask tasks: each runs in a member of the
    pool, as a worker process's task did before nodes had pools."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        import cloudpickle

        return self._pool.put_call(cloudpickle.dumps((fn, args, kwargs)))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass  # the agent closes the pool
