"""Module-level task functions for tests/test_contract.py.

They live in an importable module (``tests.contract_helpers``) so that worker
processes of both executors can unpickle them by reference.
"""

from __future__ import annotations

import os
import sys
import threading
import time

#: Creating this file in a gate directory opens every gate in it; the
#: ``executor`` fixture does so at teardown so that no test can leave a task
#: blocked.
RELEASE_ALL = "RELEASE_ALL"


class ContractError(Exception):
    """A user exception raised by a task; must come back with its own type."""


class Dummy:
    """A weak-referenceable result object."""


def touch(path: str) -> None:
    with open(path, "a") as f:
        f.write("x\n")


def identity(x):
    return x


def square(x):
    return x * x


def add3(a, b, c):
    return a + b + c


def echo_call(*args, **kwargs):
    return args, kwargs


def nbytes(data) -> int:
    return len(data)


def append_and_count(items: list, value) -> int:
    """Append to the list it is given, in place; return its new length."""
    items.append(value)
    return len(items)


def make_bytes(n: int) -> bytes:
    return b"\x07" * n


def make_dummy(_=None) -> Dummy:
    return Dummy()


def make_lock():
    return threading.Lock()


def raise_contract_error(message: str):
    raise ContractError(message)


def fail_on(x, bad):
    if x == bad:
        raise ContractError(f"item {x} failed")
    return x


def sleep_then_return(seconds: float, value):
    # Sleeping inside a task is fine: it stands for work, not synchronisation.
    time.sleep(seconds)
    return value


def sleep_then_print(seconds: float, word: str) -> None:
    """Print ``word`` on the worker's stdout, which is the script's, after ``seconds``.

    One write of the whole line: ``print`` writes the word and the newline
    separately, and with ``PYTHONUNBUFFERED`` set (as it is on these machines)
    two workers printing at once interleaved them ("bananaapple", "")."""
    time.sleep(seconds)
    sys.stdout.write(f"{word}\n")
    sys.stdout.flush()


def record(path: str, value=None):
    """Append a line to ``path`` (one per call) and return ``value``."""
    touch(path)
    return value


def block(started: str, release: str, value=None, deadline: float = 30.0):
    """Mark ``started``, then poll until ``release`` (or RELEASE_ALL next to
    it) exists; fail after ``deadline`` seconds rather than hang forever."""
    touch(started)
    release_all = os.path.join(os.path.dirname(release), RELEASE_ALL)
    end = time.monotonic() + deadline
    while not (os.path.exists(release) or os.path.exists(release_all)):
        if time.monotonic() > end:
            raise TimeoutError(f"{release} never appeared")
        time.sleep(0.01)
    return value


def map_item(i: int, directory: str, blocking: tuple):
    """For map tests: item ``i`` records that it ran; items listed in
    ``blocking`` first wait on their gate in ``directory``."""
    if i in blocking:
        block(os.path.join(directory, f"{i}.started"), os.path.join(directory, f"{i}.release"))
    touch(os.path.join(directory, f"{i}.ran"))
    return i


def report_progress(queue, item):
    """Put ``item`` on a ``multiprocessing.Manager`` queue, as a call that
    reports its progress does; return it squared."""
    queue.put(item)
    return item * item


def store_pid(mapping, key) -> int:
    """Write this worker's pid into a ``Manager`` dict under ``key``."""
    mapping[key] = os.getpid()
    return os.getpid()


def wait_for_event(event, waiting, timeout: float = 30.0) -> bool:
    """Say on the ``waiting`` queue that the call runs, then wait for the
    ``Manager`` event the caller sets; ``False`` if it never does."""
    waiting.put(os.getpid())
    return event.wait(timeout)


# -- objects that fail to pickle or unpickle ----------------------------------


def refuse_to_rebuild(how: str, padding: bytes = b""):
    """Called by unpickling a ``RefusesToUnpickle``: raise as ``how`` says."""
    if how == "ValueError":
        raise ValueError("refused to unpickle, on purpose")
    if how == "SystemExit":
        raise SystemExit("refused to unpickle, on purpose")
    if how == "KeyboardInterrupt":
        raise KeyboardInterrupt("refused to unpickle, on purpose")
    raise AssertionError(how)


class RefusesToUnpickle:
    """Pickles anywhere; unpickling it raises ``how`` (``"ValueError"``,
    ``"SystemExit"`` or ``"KeyboardInterrupt"``), as a ``__reduce__`` or
    ``__setstate__`` that fails can. ``padding`` makes its pickle large."""

    def __init__(self, how: str, padding: int = 0) -> None:
        self.how = how
        self.padding = b"\x01" * padding

    def __reduce__(self):
        return (refuse_to_rebuild, (self.how, self.padding))


def make_refusing(how: str, padding: int = 0) -> RefusesToUnpickle:
    """A result that cannot be unpickled by the caller."""
    return RefusesToUnpickle(how, padding)


def refusing_if(x, bad, how: str = "ValueError", padding: int = 0):
    """``x``, except that item ``bad`` gives a result that cannot be unpickled."""
    return RefusesToUnpickle(how, padding) if x == bad else x


class DividesByZeroWhenPickled:
    """An argument whose ``__reduce__`` raises ``ZeroDivisionError``."""

    def __reduce__(self):
        return 1 / 0


class ExitsWhenPickled:
    """An object whose ``__reduce__`` raises ``SystemExit``."""

    def __reduce__(self):
        raise SystemExit("refused to pickle, on purpose")


def make_unpicklable(how: str):
    """A result whose pickling raises ``ZeroDivisionError`` or ``SystemExit``."""
    return DividesByZeroWhenPickled() if how == "ZeroDivisionError" else ExitsWhenPickled()


def task_key_or_refusing(i: int, bad: int, key_file: str):
    """``(i, the key of the Dask task running this call)``; for item ``bad``
    a result that cannot be unpickled, its task's key written to ``key_file``."""
    from distributed import get_worker

    key = str(get_worker().get_current_task())
    if i == bad:
        with open(key_file, "w") as f:
            f.write(key)
        return RefusesToUnpickle("ValueError")
    return i, key
