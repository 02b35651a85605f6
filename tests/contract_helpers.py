"""Module-level task functions for tests/test_contract.py.

They live in an importable module (``tests.contract_helpers``) so that worker
processes of both executors can unpickle them by reference.
"""

from __future__ import annotations

import os
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
    """Print ``word`` on the worker's stdout, which is the script's, after ``seconds``."""
    time.sleep(seconds)
    print(word, flush=True)


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
