"""`SulisDaskExecutor`: a `concurrent.futures.Executor` that runs on Dask."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from . import _remote
from ._engine import CallTiming, Engine
from ._map import (
    AUTO_CHUNKSIZE,
    ChunkSizer,
    MapFeed,
    default_window,
    items_hint,
    ordered_results,
)
from ._quiet import silence_dask_logs
from ._security import DeferredSecurity
from .config import ExecutorOptions, resolve_options
from .errors import BrokenSulisExecutor, ClusterStartupTimeout
from .launchers import choose_launch_mode, make_launcher
from .launchers._existing import PublishedLauncher, find_existing_cluster
from .launchers._scheduler import forwards_results, in_process_scheduler
from .launchers.base import Cluster

__all__ = ["SulisDaskExecutor"]

logger = logging.getLogger("sulis_executor")

T = TypeVar("T")


#: Modes in which the executor starts the cluster, and so makes its credentials.
SELF_STARTED_MODES = ("local", "srun", "mpi")


def job_security(mode: str, options: ExecutorOptions) -> Any:
    """The ``distributed.Security`` for this cluster, or ``None`` for plain TCP.

    A cluster we start gets TLS with credentials made for it alone. For a
    cluster someone else started, ``None`` lets Dask use its own
    configuration (``distributed.comm.tls.*``), unless a ``Security`` object
    was given.
    """
    if options.security is False:
        return None
    if options.security is True:
        if mode in SELF_STARTED_MODES:
            from ._security import generate_credentials, security_from

            return security_from(generate_credentials())
        return None
    return options.security


def _probe(address: str, security: Any, timeout: float) -> None:
    """Connect once to ``address`` and hang up, on a private event loop.

    A ``distributed.Client`` whose constructor fails to connect is left for
    the garbage collector, and its ``__del__`` can deadlock on Dask's loop
    lock when that runs at the wrong moment; so we find out first, with no
    client to leave behind. Raises what connecting raises.
    """
    import asyncio

    from distributed.comm import connect

    async def attempt() -> None:
        args = security.get_connection_args("client") if security is not None else {}
        comm = await connect(address, timeout=timeout, **args)
        await comm.close()

    # In a thread of its own: the caller may already run an event loop
    # (a notebook does), where asyncio.run would refuse.
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(attempt())
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=run, name="sulis-executor-probe", daemon=True)
    thread.start()
    thread.join(timeout + 5)
    if outcome:
        raise outcome[0]
    if thread.is_alive():
        raise TimeoutError(f"no answer from {address} within {timeout:g} s")


def _connect_error(cluster: Any, timeout: float, error: BaseException) -> Exception:
    """Say which scheduler could not be reached, and what to check."""
    where = cluster.description or str(cluster.target)
    if isinstance(error, TypeError) and "TLS" in str(error):
        return ValueError(
            f"{where} requires TLS, and no credentials were given: pass "
            f"security=distributed.Security(...) with that cluster's certificates"
        )
    return ClusterStartupTimeout(
        f"could not connect to {where} within {timeout:g} s ({error}); check that the "
        f"scheduler is running and reachable from here, or raise timeout="
    )


def _shutdown_engine(engine: Engine) -> None:
    # Used by weakref.finalize: an executor garbage collected, or still open at
    # interpreter exit, lets running work finish only briefly, then goes.
    engine.close(timeout=10)


class SulisDaskExecutor(Executor):
    """An executor that runs calls asynchronously on a Dask cluster.

    It is a drop-in replacement for
    :class:`concurrent.futures.ProcessPoolExecutor`: the positional arguments
    are the same, and so is the behaviour of ``submit``, ``map`` and
    ``shutdown``. Where the cluster comes from is decided by the keyword-only
    options (see :mod:`sulis_executor.config`): a local cluster of worker
    processes by default, or the SLURM allocation the script runs in.

    Args:
        max_workers: Worker processes of a local cluster. Defaults to the CPUs
            this process may use. Must be greater than 0.
        mp_context: How the worker processes of a local cluster start: a
            ``multiprocessing`` context, or its start method's name.
            ``"spawn"``: each is a fresh interpreter. ``"fork"`` or
            ``"forkserver"`` (and the default, on Linux): each is forked from
            a fork server that has imported Dask, never from this process
            (see ``sulis_executor.launchers``). Elsewhere workers are always
            fresh interpreters, started by ``srun`` or MPI. Also
            ``SULIS_EXECUTOR_MP_CONTEXT``.
        initializer: Called once in each worker process, including restarted
            ones, before its first task. If it fails the executor is broken.
        initargs: Arguments for ``initializer``.
        max_tasks_per_child: The most tasks (submitted calls, or ``map``
            chunks, as ``ProcessPoolExecutor`` counts them) a worker process
            runs before it leaves and a fresh one takes its place. Local
            cluster only: the processes of an ``srun`` step or an MPI job
            cannot be replaced. Also ``SULIS_EXECUTOR_MAX_TASKS_PER_CHILD``.
        **options: Launch and cluster options; see ``sulis_executor.config``.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        **options: Any,
    ) -> None:
        if max_workers is not None:
            if isinstance(max_workers, bool) or not isinstance(max_workers, int):
                raise TypeError(f"max_workers must be an integer, not {max_workers!r}")
            if max_workers <= 0:
                raise ValueError(f"max_workers must be greater than 0, got {max_workers}")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be a callable, not {initializer!r}")
        if max_tasks_per_child is not None:
            if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int):
                raise TypeError(f"max_tasks_per_child must be an integer, not {max_tasks_per_child!r}")
            if max_tasks_per_child <= 0:
                raise ValueError(f"max_tasks_per_child must be >= 1, got {max_tasks_per_child}")
        self._options: ExecutorOptions = resolve_options(
            dict(options, max_workers=max_workers, mp_context=mp_context,
                 max_tasks_per_child=max_tasks_per_child),
            os.environ,
        )
        silence_dask_logs(self._options.verbose)
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._teardown_thread: threading.Thread | None = None
        # Maps still reading their inputs, which shutdown finishes (see _map).
        self._maps: weakref.WeakSet[MapFeed] = weakref.WeakSet()
        # A cluster this process already uses (dask_mpi.initialize(), the
        # user's Client, Dask's config) is joined, not started again.
        existing = find_existing_cluster(os.environ)
        self._mode, reason = choose_launch_mode(self._options, os.environ, existing)
        logger.info("launch mode %r: %s", self._mode, reason)
        if self._options.max_tasks_per_child is not None and self._mode != "local":
            source = self._options.sources.get("max_tasks_per_child", "argument max_tasks_per_child=")
            raise ValueError(
                f"max_tasks_per_child needs a local cluster, whose worker processes the "
                f"executor can replace; in {self._mode!r} mode ({reason}) the workers are "
                f"fixed. Unset it ({source}), or use launch='local'"
            )
        self._launcher = make_launcher(self._mode, self._options, self._job_security(), existing)
        self._engine = self._start(initializer, tuple(initargs))
        self._finalizer = weakref.finalize(self, _shutdown_engine, self._engine)
        # An executor still open at exit is closed by an atexit hook of its
        # own, registered after Dask's: atexit runs hooks last-in first-out,
        # so ours runs while Dask's event loops still run, and the workers'
        # exit signals find a live loop instead of a closed wakeup fd.
        atexit.register(self._finalizer)

    def _job_security(self) -> Any:
        if self._mode == "local":
            # Made once the workers are on their way (see DeferredSecurity).
            return DeferredSecurity(lambda: job_security(self._mode, self._options))
        return job_security(self._mode, self._options)

    def _start(self, initializer: Callable[..., object] | None, initargs: tuple[Any, ...]) -> Engine:
        from distributed import Client

        started = time.monotonic()
        deadline = started + self._options.timeout
        try:
            cluster = self._launcher.start(self._options.timeout)
            try:
                if isinstance(cluster.target, str):
                    _probe(cluster.target, cluster.security, max(1.0, deadline - time.monotonic()))
                client = Client(
                    cluster.target,
                    security=cluster.security,
                    timeout=max(1.0, deadline - time.monotonic()),
                    set_as_default=True,
                )
            except (OSError, TimeoutError, TypeError) as error:
                raise _connect_error(cluster, self._options.timeout, error) from error
        except BaseException:  # Ctrl-C or SIGTERM too: never leave workers behind
            self._launcher.close(timeout=10)
            raise
        token = uuid.uuid4().hex
        launcher: Any = self._launcher
        try:
            if initializer is not None:
                client.register_plugin(
                    _remote.InitializerPlugin(initializer, initargs),
                    name=_remote.initializer_plugin_name(token),
                )
            if self._options.max_tasks_per_child is not None:
                client.register_plugin(
                    _remote.TaskBudget(token, self._options.max_tasks_per_child),
                    name=_remote.task_budget_plugin_name(token),
                )
            if cluster.min_workers:
                self._wait_for_workers(client, cluster, deadline)
            # While open, Dask's config names this cluster: Client() joins it.
            launcher = PublishedLauncher(self._launcher, client)
            engine = Engine(client, launcher, token, initializer is not None,
                            cluster.workers_reachable, cluster.shared_directory,
                            forwards_results(client, cluster.target),
                            one_call_per_task=self._options.max_tasks_per_child is not None,
                            scheduler=in_process_scheduler(cluster.target))
        except BaseException:
            client.close()
            launcher.close(timeout=10)
            raise
        logger.info(
            "%s ready: %d workers in %.2f s",
            cluster.description,
            len(client.scheduler_info()["workers"]),
            time.monotonic() - started,
        )
        return engine

    @staticmethod
    def _wait_for_workers(client: Any, cluster: Cluster, deadline: float) -> None:
        count = cluster.min_workers
        # A scheduler in this process is watched directly: Client.wait_for_workers
        # asks the scheduler every 0.1 s, a tenth of a second of start-up time.
        scheduler = getattr(cluster.target, "scheduler", None)
        try:
            if scheduler is not None and hasattr(scheduler, "workers"):
                while len(scheduler.workers) < count:
                    if time.monotonic() > deadline:
                        raise TimeoutError
                    time.sleep(0.005)
            else:
                client.wait_for_workers(count, timeout=max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            arrived = len(client.scheduler_info()["workers"])
            raise ClusterStartupTimeout(
                f"only {arrived} of {count} workers of {cluster.description} arrived before the "
                f"timeout; check the workers' output for errors, that they can reach the "
                f"scheduler on the chosen interface, or raise timeout="
            ) from None

    def __reduce__(self) -> Any:
        raise TypeError(
            "a SulisDaskExecutor cannot be sent to a worker, so tasks cannot submit to "
            "their own executor; return the work to the client and submit from there, "
            "or use distributed.worker_client() inside the task"
        )

    # -- introspection ----------------------------------------------------

    @property
    def client(self) -> Any:
        """The :class:`distributed.Client` this executor submits through."""
        return self._engine.client

    @property
    def num_workers(self) -> int:
        """Workers connected to the scheduler now."""
        return len(self._engine.client.scheduler_info()["workers"])

    @property
    def dashboard_link(self) -> str | None:
        """The dashboard URL, or ``None`` when the dashboard is off."""
        return self._launcher.dashboard_link()

    @property
    def launch_mode(self) -> str:
        """The launch mode in use (what ``launch='auto'`` resolved to)."""
        return self._mode

    # -- the Executor API -------------------------------------------------

    def _check_usable(self) -> None:
        if self._engine.broken is not None:
            raise self._engine.broken_error()
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        with self._shutdown_lock:
            self._check_usable()
            if not callable(fn):
                raise TypeError(f"submit() needs a callable as its first argument, not {fn!r}")
            return self._engine.submit_call(fn, args, kwargs)

    submit.__doc__ = Executor.submit.__doc__

    def map(  # type: ignore[override]
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = AUTO_CHUNKSIZE,
        buffersize: int | None = None,
        progress: bool = False,
    ) -> Iterator[T]:
        """Return an iterator equivalent to ``map(fn, *iterables)``.

        As in Python 3.14: results come in order; ``timeout`` counts from this
        call; several iterables stop at the shortest; closing or dropping the
        iterator cancels what is left. ``chunksize`` items go to the cluster
        as one task; left at its default, chunks are sized automatically from
        measured call times. At most ``buffersize`` chunks are submitted and
        not yet yielded (default: four per worker thread), and the iterables
        are read lazily, so long and infinite inputs run in bounded memory.
        ``progress=True`` shows a progress bar (see ``sulis_executor.progress``).
        """
        if buffersize is not None:
            if isinstance(buffersize, bool) or not isinstance(buffersize, int):
                raise TypeError(f"buffersize must be an integer or None, not {buffersize!r}")
            if buffersize < 1:
                raise ValueError(f"buffersize must be None or > 0, got {buffersize}")
        if isinstance(chunksize, bool) or not isinstance(chunksize, int):
            raise TypeError(f"chunksize must be an integer, not {chunksize!r}")
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if not callable(fn):
            raise TypeError(f"map() needs a callable as its first argument, not {fn!r}")
        end_time = None if timeout is None else timeout + time.monotonic()
        with self._shutdown_lock:
            self._check_usable()
        engine = self._engine
        self_ref = weakref.ref(self)  # the results iterator must not keep us alive

        def submit_chunks(fn: Callable[..., Any], chunks: list[tuple[list[Any], int]],
                          star: bool) -> list[Future[Any]]:
            executor = self_ref()
            if executor is None or executor._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            with executor._shutdown_lock:
                executor._check_usable()
            return engine.submit_chunks(fn, chunks, star, timing)

        fixed = None if chunksize is AUTO_CHUNKSIZE else chunksize
        # Chunks of the caller's size may travel together once measured
        # short; automatic ones are sized to keep a worker busy alone.
        timing = None if fixed is None else CallTiming()
        total = items_hint(iterables)
        sizer = ChunkSizer(fixed, lambda: engine.threads, total)
        window = buffersize if buffersize is not None else default_window(engine.threads, fixed)

        def submit_rest(fn: Callable[..., Any], chunks: list[tuple[list[Any], int]],
                        star: bool) -> list[Future[Any]]:
            # Shutdown finishing the map: as ProcessPoolExecutor's map, it
            # submits every call, even once new work is refused.
            return engine.submit_chunks(fn, chunks, star, timing)

        # A map given buffersize submits only as it is read, as CPython's: not finished.
        finish = None if buffersize is not None else (self._maps.add, submit_rest)
        results = ordered_results(fn, iterables, sizer, window, submit_chunks, end_time,
                                  engine.abandon_chunks, lambda: engine.threads, finish)
        if progress:
            from ._progress import progress as show_progress

            return show_progress(results, total=total, desc=getattr(fn, "__name__", None))
        return results

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        # Maps still reading their inputs are finished, as ProcessPoolExecutor's
        # (which submit everything at once) would be, or cut (see _map).
        maps = list(self._maps)
        for feed in maps:
            feed.stop_refilling()
        with self._shutdown_lock:
            self._shutdown = True
        for feed in maps:
            if cancel_futures or self._engine.broken is not None:
                feed.cut()
            else:
                feed.drain()
        if cancel_futures:
            self._engine.cancel_queued()
        if wait:
            teardown = self._teardown_thread
            if teardown is not None:
                teardown.join()
            self._engine.wait_idle()
            self._finalizer()
            atexit.unregister(self._finalizer)
            return
        with self._shutdown_lock:
            if self._teardown_thread is None and self._finalizer.alive:
                # Not a daemon: like ProcessPoolExecutor, the interpreter waits
                # for work that was already submitted before it exits.
                self._teardown_thread = threading.Thread(
                    target=_finish_then_close,
                    args=(self._engine, self._finalizer),
                    name="sulis-executor-shutdown",
                )
                self._teardown_thread.start()

    shutdown.__doc__ = Executor.shutdown.__doc__

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> bool | None:
        if exc_type is not None:
            # An exception (Ctrl-C too) leaves the with block: the code after
            # it, which could read a map's results, does not run, so no map is
            # finished (see _map); what was submitted still runs.
            for feed in list(self._maps):
                feed.cut()
        return super().__exit__(exc_type, exc_val, exc_tb)

    def terminate_workers(self) -> None:
        """Terminate every worker process now (SIGTERM; SIGKILL for those
        still there a second later, since a worker closes on SIGTERM only
        once its running call ends), as ``ProcessPoolExecutor`` does since
        Python 3.14, and shut down without waiting.

        Calls not yet started are cancelled, and those running fail with
        :class:`BrokenSulisExecutor` (a ``BrokenProcessPool``). Only workers
        this executor started (a local cluster, an ``srun`` step) can be
        terminated; otherwise ``NotImplementedError`` is raised, and nothing
        changes.
        """
        self._force_shutdown(signal.SIGTERM, "terminate_workers", "terminated")

    def kill_workers(self) -> None:
        """As :meth:`terminate_workers`, with SIGKILL: no worker gets to
        clean up."""
        self._force_shutdown(signal.SIGKILL, "kill_workers", "killed")

    def _force_shutdown(self, signum: int, method: str, done: str) -> None:
        if not self._launcher.signal_workers(signum):
            whose = ("ranks of this MPI job, whose end would end the job" if self._mode == "mpi"
                     else "run by whoever started the cluster this executor attached to")
            raise NotImplementedError(
                f"{method}() stops only worker processes this executor started (a local "
                f"cluster or an srun step); in {self._mode!r} mode they are {whose}. "
                f"shutdown(wait=False, cancel_futures=True) stops the work instead"
            )
        with self._shutdown_lock:
            self._shutdown = True
        self._engine.cancel_queued()
        self._engine.mark_broken(f"the executor's worker processes were {done} by {method}()")
        self.shutdown(wait=False)


def _finish_then_close(engine: Engine, finalizer: weakref.finalize) -> None:
    engine.wait_idle()
    finalizer()


# BrokenSulisExecutor is part of this module's story; re-exported for convenience.
__all__ += ["BrokenSulisExecutor"]
