"""How long an executor's engine (its cluster) lives, and interpreter exit.

As with ``ProcessPoolExecutor``, work once submitted is never dropped. An
executor's engine is kept by a :class:`Lifetime`, whose users are the
executor and each of its ``map`` results iterators still open (each holds
it through a :class:`Hold`). ``shutdown()`` refuses new work and closes the
engine once every submitted call has settled (at once, or in a closer
thread for ``wait=False``). An executor garbage collected without
``shutdown`` only lets go of its engine: iterators still open go on
submitting their chunks, futures already handed out still get their
results, and the engine closes once no user is left and every call has
settled.

At interpreter exit, ``finish_at_exit`` runs from ``threading``'s exit
hooks, before ``concurrent.futures.thread``'s: that one makes every
``ThreadPoolExecutor`` refuse work, which Dask needs to take a graph in or
run a future's callbacks, so a call still waiting after it would never
settle. Ours runs while Dask still works: from then on ``submit`` raises
``RuntimeError('cannot schedule new futures after interpreter shutdown')``,
and every open engine finishes its calls, without a deadline as
``ProcessPoolExecutor`` does, then closes. Waiting cannot hang on a cluster
that is gone: a lost scheduler breaks the engine, which fails its futures.
Ctrl-C while waiting stops the wait: queued calls are cancelled, running
ones fail, and the clusters close.

Kept apart from ``executor``, whose class is the public API: nothing here
refers to an executor, so that one can be garbage collected while its work
goes on.
"""

from __future__ import annotations

import atexit

# Imported before our exit hook is registered, so that its own hook, which
# stops every ThreadPoolExecutor, runs after ours (see register_exit_hook).
import concurrent.futures.thread  # noqa: F401
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from typing import TypeVar

from ._engine import Engine

logger = logging.getLogger("sulis_executor")

T = TypeVar("T")


#: Set once the interpreter has begun to exit (see finish_at_exit).
_interpreter_exiting = False


def interpreter_exiting() -> bool:
    """Whether the interpreter has begun to exit (see ``finish_at_exit``)."""
    return _interpreter_exiting

#: Lifetimes whose engines are still open, closed at exit if need be.
_open_lifetimes: set[Lifetime] = set()
_open_lifetimes_lock = threading.Lock()


class Lifetime:
    """Who still needs an engine, and closing it once nobody does (see the
    module docstring). Never refers to the executor, so that one can be
    garbage collected."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Guards shut_down and every submission, so that none slips in after
        # shutdown or interpreter exit has begun waiting for the work.
        self.lock = threading.Lock()
        self.shut_down = False
        self.pid = os.getpid()
        self._closed = False
        # Held only for arithmetic, never across a call that can block or
        # allocate: _release runs from the garbage collector, in any thread.
        self._users_lock = threading.Lock()
        self._users = 0
        self._closer: threading.Thread | None = None
        # Held while closing, so that whoever else closes waits until it is done.
        self._closing = threading.Lock()
        with _open_lifetimes_lock:
            _open_lifetimes.add(self)
        # Registered after Dask's atexit handlers, so it runs before them.
        atexit.register(self._close_at_exit)

    def check_usable(self) -> None:
        """Raise what ``ProcessPoolExecutor.submit`` raises for new work now."""
        if self.engine.broken is not None:
            raise self.engine.broken_error()
        if self.shut_down:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _interpreter_exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        if self._closed:  # never reached by a user: a safeguard
            raise RuntimeError("cannot schedule new futures after shutdown")

    def hold(self, user: object) -> weakref.finalize:
        """Count ``user`` until it is garbage collected, or until the
        finalizer returned is called, whichever comes first."""
        with self._users_lock:
            self._users += 1
        release = weakref.finalize(user, self._release)
        release.atexit = False  # interpreter exit has a hook of its own
        return release

    def _release(self) -> None:
        # From the garbage collector too, even on Dask's event loop: must
        # not block, so the waiting and closing happen in a thread.
        with self._users_lock:
            self._users -= 1
            last = self._users == 0
        if last:
            self.close_when_idle()

    def close_when_idle(self) -> None:
        """Close once every call has settled, in a thread of its own (a
        daemon: at exit, finish_at_exit waits for the work instead)."""
        closer = threading.Thread(target=self.finish, name="sulis-executor-shutdown", daemon=True)
        with self._users_lock:
            if self._closer is not None or self._closed:
                return
            self._closer = closer
        closer.start()

    def finish(self) -> None:
        """Wait for every call submitted to settle, then close."""
        self.engine.wait_idle()
        self.close()

    def close(self) -> None:
        """Close the engine now: calls still queued are cancelled, running ones fail."""
        with self._closing:
            self._closed = True
            self.engine.close(timeout=10)
        with _open_lifetimes_lock:
            _open_lifetimes.discard(self)
        atexit.unregister(self._close_at_exit)

    def _close_at_exit(self) -> None:
        # Only if finish_at_exit did not get to it (an error or a Ctrl-C in
        # another of threading's exit hooks stops them all): too late to wait
        # for the work (ThreadPoolExecutors are stopped), but Dask's event
        # loops still run. Not in a forked child, which inherits the handler.
        if self.pid == os.getpid():
            self.close()


def finish_at_exit() -> None:
    """At interpreter exit: refuse new work, let every open engine finish
    its calls, and close it (see the module docstring)."""
    global _interpreter_exiting
    _interpreter_exiting = True
    with _open_lifetimes_lock:
        # Those of this process only: a forked child inherits the set, not
        # the threads that would settle its futures.
        lifetimes = [lifetime for lifetime in _open_lifetimes if lifetime.pid == os.getpid()]
    try:
        for lifetime in lifetimes:
            with lifetime.lock:
                pass  # a submission under way is queued by now, and waited for
            try:
                lifetime.finish()
            except Exception:
                logger.debug("error finishing an executor's work at exit", exc_info=True)
    except KeyboardInterrupt:
        # Ctrl-C while waiting: stop waiting, close every cluster, and let
        # Python report it, as it does for ProcessPoolExecutor.
        for lifetime in lifetimes:
            try:
                lifetime.close()
            except Exception:
                logger.debug("error closing an executor at exit", exc_info=True)
        raise


def register_exit_hook() -> None:
    """Run finish_at_exit among ``threading``'s exit hooks, which run last
    registered first, before the interpreter joins non-daemon threads and
    before ``atexit`` handlers; ``concurrent.futures.thread`` registered
    its own when imported, at the top of this module, so ours runs before
    it. Where there are no such hooks (not CPython), an ``atexit`` handler
    is the next best thing. Called once, by ``executor`` once its own
    imports are done."""
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(finish_at_exit)
            return
        except RuntimeError:  # imported while the interpreter exits
            pass
    atexit.register(finish_at_exit)


class Hold:
    """A ``map`` results iterator's hold on its executor's engine, let go
    once: when the iterator ends, or when it is garbage collected, even
    unstarted (a generator not started runs no ``finally``)."""

    __slots__ = ("release", "__weakref__")

    def __init__(self, lifetime: Lifetime) -> None:
        self.release = lifetime.hold(self)


def released_at_end(results: Iterator[T], hold: Hold) -> Iterator[T]:
    # The frame keeps ``hold`` until the generator ends or is collected.
    try:
        yield from results
    finally:
        hold.release()
