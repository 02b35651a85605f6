"""Task functions for the executor tests.

They live in an importable module (not in test files) because worker
processes unpickle them by reference.
"""

from __future__ import annotations

import os
import time

_initialized_in: list[int] = []


def record_initializer(path: str, tag: str) -> None:
    _initialized_in.append(os.getpid())
    with open(path, "a") as f:
        f.write(f"{tag} {os.getpid()}\n")


def failing_initializer() -> None:
    raise RuntimeError("initializer failed on purpose")


def pid_and_initialized() -> tuple[int, bool]:
    return os.getpid(), os.getpid() in _initialized_in


def echo_kwargs(**kwargs: object) -> dict[str, object]:
    return kwargs


def append_line(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text + "\n")


def square(x: int) -> int:
    return x * x


def pid_of_worker(_: object = None) -> int:
    return os.getpid()


def kill_own_process() -> None:
    os._exit(13)


def slow_identity(x: int, delay: float = 0.01) -> int:
    time.sleep(delay)
    return x


def raise_value_error(x: int) -> None:
    raise ValueError(f"bad item {x}")


def wait_for_file(path: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)
    return path


def array_sum(array, offset: float = 0.0) -> float:
    return float(array.sum()) + offset


def submit_from_inside(executor, x: int) -> int:
    return executor.submit(square, x).result()


_kept_alive: list[object] = []


def array_identity(array, _: object = None) -> tuple[int, int]:
    """Which process, and which copy of the array, this call saw. The array
    is kept alive so a later copy can never reuse its address."""
    _kept_alive.append(array)
    return os.getpid(), id(array)
