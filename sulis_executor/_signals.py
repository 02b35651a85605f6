"""Signals sent to the process go to its main thread.

Python runs signal handlers in the main thread only. The kernel hands a
signal sent to the process (Ctrl-C, ``kill``) to any one thread that does
not block it; if that is not the main thread, Python's handler there only
sets a flag, and a main thread asleep in a lock wait without a timeout
(``future.result()``) is not woken to act on it: Ctrl-C waits for the next
future to finish, which may be never. Linux picks the main thread when it
can take the signal; other systems (macOS) pick any thread. So the threads
the executor starts, and those Dask starts for it, block SIGINT and SIGTERM,
and the other signals that have a Python handler when they start, and the
kernel delivers those to the main thread.

A thread inherits the signal mask of the thread that creates it, so the
signals are blocked in the creating thread only while it creates threads
(:func:`leave_signals_to_main_thread`), and restored at once: a Ctrl-C that
arrives then is held for that instant, not lost. Never around long waits
(an ``srun`` step's workers can take 30 s to arrive, and Ctrl-C must end
that wait).

A process inherits the mask too, through ``fork`` and ``exec``: our worker
processes and fork server, started from such threads, unblock the signals
first thing (:func:`unblock_signals`). The executor's results thread is
left alone: the futures' done callbacks run there, and a process one of
them starts would begin deaf to Ctrl-C and to ``terminate()``. On Linux the
main thread takes a signal sent to the process whenever it does not block
it, so that thread taking one is a concern on other systems only.

``pthread_sigmask`` is POSIX; elsewhere (Windows) all of this does nothing.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

#: Always left to the main thread: Ctrl-C, and the polite request to end
#: (whose default action ends the process from whichever thread takes it).
ALWAYS = ("SIGINT", "SIGTERM")
#: Left to the main thread when a Python handler is set for them as our
#: threads start (say, pytest-timeout's SIGALRM, a job script's SIGUSR1).
IF_HANDLED = ("SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM")


def _signals(names: tuple[str, ...]) -> set[signal.Signals]:
    return {getattr(signal, name) for name in names if hasattr(signal, name)}


def signals_for_the_main_thread() -> set[signal.Signals]:
    """The signals that threads started now are to block."""
    handled = {s for s in _signals(IF_HANDLED) if callable(signal.getsignal(s))}
    return _signals(ALWAYS) | handled


@contextlib.contextmanager
def leave_signals_to_main_thread() -> Iterator[None]:
    """Threads started inside block :func:`signals_for_the_main_thread`.

    Keep what runs inside short: the calling thread blocks those signals
    too, until it leaves.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals_for_the_main_thread())
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def unblock_signals() -> None:
    """In a process started by one of our threads: take the signals that
    thread blocked, as a process started from the main thread would."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _signals(ALWAYS + IF_HANDLED))
