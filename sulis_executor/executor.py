"""`SulisDaskExecutor`: a `concurrent.futures.Executor` that runs on Dask.

Work once submitted is never dropped, as with ``ProcessPoolExecutor``, and
an executor garbage collected without ``shutdown`` lets its work finish:
how long its engine (its cluster) lives, and what happens at interpreter
exit, is ``_lifetime``'s. How the cluster is started and joined is
``_startup``'s; how calls reach it and come back, ``_engine``'s.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from . import _journal
from ._calls import CallTiming
from ._lifetime import Hold, Lifetime, interpreter_exiting, register_exit_hook, released_at_end
from ._map import (
    AUTO_CHUNKSIZE,
    ChunkSizer,
    MapFeed,
    default_window,
    items_hint,
    ordered_results,
)
from ._quiet import silence_dask_logs
from ._startup import launch_security, start_engine
from ._walltime import Walltime, install_signal_handler, job_end_time, register
from .config import ExecutorOptions, resolve_options
from .errors import BrokenSulisExecutor, UnpicklableError
from .launchers import choose_launch_mode, make_launcher
from .launchers._existing import find_existing_cluster

__all__ = ["SulisDaskExecutor"]

logger = logging.getLogger("sulis_executor")

T = TypeVar("T")


# Last, once every module this one needs is imported (see register_exit_hook).
register_exit_hook()


class SulisDaskExecutor(Executor):
    """An executor that runs calls asynchronously on a Dask cluster.

    It is a drop-in replacement for
    :class:`concurrent.futures.ProcessPoolExecutor`: the positional arguments
    are the same, and so is the behaviour of ``submit``, ``map`` and
    ``shutdown``. Where the cluster comes from is decided by the keyword-only
    options (see :mod:`sulis_executor.config`): a local cluster of worker
    processes by default, or the SLURM allocation the script runs in.

    Work once submitted is never dropped, as with ``ProcessPoolExecutor``.
    An executor garbage collected without ``shutdown()`` closes its cluster
    only once its calls have settled and its ``map`` iterators are done
    (those go on submitting their chunks). At interpreter exit, ``submit``
    raises ``RuntimeError``, and every executor still open waits for its
    calls, with no deadline, then closes; a lost cluster fails the calls
    instead, so the wait cannot hang on it, and Ctrl-C ends it.

    Args:
        max_workers: Worker processes of a local cluster. Defaults to the CPUs
            this process may use. Must be greater than 0.
        mp_context: How the worker processes of a local cluster start: a
            ``multiprocessing`` context, or its start method's name.
            ``"spawn"``: each is a fresh interpreter. ``"fork"`` or
            ``"forkserver"`` (and the default, on Linux): each is forked from
            a fork server that has imported Dask, never from this process
            (see ``sulis_executor.launchers``). Under ``srun`` each node's
            workers are forked from one fresh interpreter per node, and under
            MPI they are the ranks, whatever this says. Also
            ``SULIS_EXECUTOR_MP_CONTEXT``.
        initializer: Called once in each worker process, including restarted
            ones, before its first task. If it fails the executor is broken.
        initargs: Arguments for ``initializer``.
        max_tasks_per_child: The most tasks (submitted calls, or ``map``
            chunks, as ``ProcessPoolExecutor`` counts them) a worker process
            runs before it leaves and a fresh one takes its place. Local
            cluster only: the processes of an ``srun`` step or an MPI job
            cannot be replaced. Also ``SULIS_EXECUTOR_MAX_TASKS_PER_CHILD``.
        **options: Launch and cluster options (``launch``, ``interface``,
            ``timeout``, ``journal``, ...), each also an environment variable
            and a Dask config key; see ``sulis_executor.config`` and the
            manual's *Configuration* page (docs/configuration.rst).
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
        if interpreter_exiting():
            # Its cluster could not start reliably now, nor would it take work.
            raise RuntimeError("cannot start a SulisDaskExecutor after interpreter shutdown has begun")
        # Maps still reading their inputs, which shutdown finishes (see _map).
        self._maps: weakref.WeakSet[MapFeed] = weakref.WeakSet()
        # A cluster this process already uses (dask_mpi.initialize(), the
        # user's Client, Dask's config) is joined, not started again.
        existing = find_existing_cluster(os.environ)
        self._mode, reason = choose_launch_mode(self._options, os.environ, existing)
        logger.info("launch mode %r: %s", self._mode, reason)
        # Members are replaced by whoever forked them: the fork server (local)
        # or the node process of the srun step. MPI ranks, and workers of a
        # cluster someone else started, cannot be.
        if self._options.max_tasks_per_child is not None and self._mode not in ("local", "srun"):
            source = self._options.sources.get("max_tasks_per_child", "argument max_tasks_per_child=")
            raise ValueError(
                f"max_tasks_per_child needs worker processes the executor can replace "
                f"(launch='local' or 'srun'); in {self._mode!r} mode ({reason}) the workers are "
                f"fixed. Unset it ({source}), or use launch='local' or launch='srun'"
            )
        # Opened first: a file that is not a journal fails before any process starts.
        self._journal = (None if self._options.journal is None
                         else _journal.open_journal(self._options.journal))
        try:
            security = launch_security(self._mode, self._options)
            self._launcher = make_launcher(self._mode, self._options, security, existing)
            # In a SLURM job: no call starts too near the time limit, or after
            # SIGUSR1 (see _walltime).
            self._walltime = Walltime(None, self._options.walltime_margin)
            install_signal_handler(os.environ)
            self._engine = start_engine(self._launcher, self._options, self._walltime,
                                        initializer, tuple(initargs))
        except BaseException:
            if self._journal is not None:
                self._journal.flush()
            raise
        # Asked once started: an mpi mode's worker ranks never get here,
        # so only rank 0 asks SLURM.
        self._walltime.set_end(job_end_time(os.environ),
                               margin_is_default=self._options.sources.get("walltime_margin") == "default")
        register(self._engine)
        self._lifetime = Lifetime(self._engine)
        # Collected without shutdown(), the executor only lets go: its work
        # still finishes, and the cluster closes after (see _lifetime).
        self._lifetime.hold(self)

    def __reduce__(self) -> Any:
        raise UnpicklableError(
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
        """The worker processes that run calls now.

        On a cluster the executor started, the members of its nodes' pools;
        on another, Dask's workers."""
        return self._engine.worker_count()

    @property
    def dashboard_link(self) -> str | None:
        """The dashboard URL, or ``None`` when the dashboard is off."""
        return self._launcher.dashboard_link()

    @property
    def launch_mode(self) -> str:
        """The launch mode in use (what ``launch='auto'`` resolved to)."""
        return self._mode

    # -- the Executor API -------------------------------------------------

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedules ``fn(*args, **kwargs)`` to run on the cluster.

        As :meth:`concurrent.futures.Executor.submit`: keyword arguments reach
        ``fn`` untouched (even ones named ``key`` or ``pure``), and every call
        runs, identical ones too. With a resume journal, a call recorded by an
        earlier run returns a future that is already done.

        Returns:
            A :class:`concurrent.futures.Future` representing the given call.
        """
        journal, key = self._journal, None
        if journal is not None and callable(fn):
            key = _journal.call_key(_journal.function_digest(fn), args, kwargs)
        with self._lifetime.lock:
            self._lifetime.check_usable()
            if not callable(fn):
                raise TypeError(f"submit() needs a callable as its first argument, not {fn!r}")
            if journal is None:
                return self._engine.submit_call(fn, args, kwargs)
            hit, value = journal.lookup(key)
            if hit:  # recorded by an earlier run: done already
                done: Future[T] = Future()
                done.set_running_or_notify_cancel()
                done.set_result(value)
                return done
            future = self._engine.submit_call(fn, args, kwargs)
        future.add_done_callback(lambda f: _record_outcome(journal, key, f))
        return future


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
        lifetime = self._lifetime
        with lifetime.lock:
            lifetime.check_usable()
        engine = self._engine

        # The results iterator refers to the lifetime, not to us: it may
        # outlive a garbage collected executor, and go on submitting.
        def submit_chunks(fn: Callable[..., Any], chunks: list[tuple[list[Any], int]],
                          star: bool) -> list[Future[Any]]:
            with lifetime.lock:
                lifetime.check_usable()
                return engine.submit_chunks(fn, chunks, star, timing, sizer.seconds_per_item)

        fixed = None if chunksize is AUTO_CHUNKSIZE else chunksize
        # Chunks of the caller's size may travel together once measured
        # short; automatic ones are sized to keep a worker busy alone.
        timing = None if fixed is None else CallTiming()
        total = items_hint(iterables)
        journal, slots = self._journal, collections.deque()  # type: ignore[var-annotated]
        if journal is not None:
            # Only the items the journal lacks go to the cluster (see _journaled).
            iterables = _missing_items(journal, _journal.function_digest(fn), iterables, slots)
        sizer = ChunkSizer(fixed, lambda: engine.threads, None if journal else total)
        window = buffersize if buffersize is not None else default_window(engine.threads, fixed)

        def submit_rest(fn: Callable[..., Any], chunks: list[tuple[list[Any], int]],
                        star: bool) -> list[Future[Any]]:
            # Shutdown finishing the map: as ProcessPoolExecutor's map, it
            # submits every call, even once new work is refused.
            return engine.submit_chunks(fn, chunks, star, timing, sizer.seconds_per_item)

        # A map given buffersize submits only as it is read, as CPython's: not finished.
        finish = None if buffersize is not None else (self._maps.add, submit_rest)
        hold = Hold(lifetime)  # until the iterator ends, or is dropped
        try:
            results = released_at_end(
                ordered_results(fn, iterables, sizer, window, submit_chunks, end_time,
                                engine.abandon_chunks, lambda: engine.threads, finish),
                hold,
            )
        except BaseException:
            hold.release()
            raise
        if journal is not None:
            results = _journaled(results, slots, journal)
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
        with self._lifetime.lock:
            self._lifetime.shut_down = True
        for feed in maps:
            if cancel_futures or self._engine.broken is not None:
                feed.cut()
            else:
                feed.drain()
        if cancel_futures:
            self._engine.cancel_queued()
        if wait:
            self._lifetime.finish()
            if self._journal is not None:
                self._journal.flush()
        else:
            # The interpreter still waits for this work before it exits
            # (see _finish_at_exit), as for ProcessPoolExecutor's.
            self._lifetime.close_when_idle()

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
        with self._lifetime.lock:
            self._lifetime.shut_down = True
        self._engine.cancel_queued()
        self._engine.mark_broken(f"the executor's worker processes were {done} by {method}()")
        self.shutdown(wait=False)


def _record_outcome(journal: _journal.Journal, key: bytes | None, future: Future[Any]) -> None:
    """Record a submitted call's result; exceptions are not recorded, so a
    rerun runs a failed call again."""
    if not future.cancelled() and future.exception() is None:
        journal.record(key, future.result())


def _missing_items(
    journal: _journal.Journal,
    fn_digest: bytes,
    iterables: tuple[Iterable[Any], ...],
    slots: collections.deque[tuple[bool, Any]],
) -> tuple[Iterator[Any], ...]:
    """The iterables of a journaled ``map``, cut to the items the journal
    lacks. As they are read, every item leaves in ``slots``, in order,
    ``(True, its recorded result)`` or ``(False, its key)``."""

    def missing() -> Iterator[tuple[Any, ...]]:
        for row in zip(*iterables):
            key = _journal.call_key(fn_digest, row, {})
            hit, value = journal.lookup(key)
            if hit:
                slots.append((True, value))
            else:
                slots.append((False, key))
                yield row

    rows = missing()
    if len(iterables) == 1:
        return ((row[0] for row in rows),)
    # Columns again, for a map of several iterables: zip reads the first
    # column first, which fetches the row the others then read.
    current: list[tuple[Any, ...]] = []

    def first() -> Iterator[Any]:
        for row in rows:
            current[:] = [row]
            yield row[0]

    def column(i: int) -> Iterator[Any]:
        while True:
            yield current[0][i]

    return (first(), *(column(i) for i in range(1, len(iterables))))


def _journaled(results: Iterator[Any], slots: collections.deque[tuple[bool, Any]],
               journal: _journal.Journal) -> Iterator[Any]:
    """A journaled ``map``'s results: recorded ones from ``slots``, the
    others from ``results`` (the cluster's), each recorded as yielded."""
    ready: collections.deque[tuple[bool, Any]] = collections.deque()
    try:
        while True:
            if not slots:
                # Reading on makes the map read its inputs: the next
                # missing item's result, and the recorded ones before it.
                try:
                    ready.append((True, next(results)))
                except StopIteration:
                    if not slots:
                        return
                except Exception as error:  # the next missing item's: raised in its turn
                    if not slots:
                        raise
                    ready.append((False, error))
                continue
            hit, payload = slots.popleft()
            if hit:
                yield payload
                del payload
                continue
            ok, value = ready.popleft() if ready else (True, next(results))
            if not ok:
                raise value
            journal.record(payload, value)
            yield value
            del value
    finally:
        results.close()  # type: ignore[attr-defined]


# BrokenSulisExecutor is part of this module's story; re-exported for convenience.
__all__ += ["BrokenSulisExecutor"]
