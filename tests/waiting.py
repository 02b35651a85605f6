"""Waiting in tests: every wait polls with a deadline, never a bare sleep."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import psutil


def wait_until(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> None:
    """Return once ``predicate()`` is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def alive(pids: Iterable[int]) -> set[int]:
    """The pids among ``pids`` of processes still running (zombies are not)."""
    running = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.add(pid)
        except psutil.NoSuchProcess:
            pass
    return running


def alive_after(pids: Iterable[int], timeout: float) -> list[int]:
    """The pids among ``pids`` still running once they all ended, or after ``timeout``."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while (left := alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return sorted(left)
