"""Task functions for the executor tests.

They live in an importable module (not in test files) because worker
processes unpickle them by reference.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

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


def append_line_then_sleep(path: str, text: str, delay: float) -> None:
    append_line(path, text)
    time.sleep(delay)


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


def large_inputs_held(array, _: object = None) -> tuple[str, ...]:
    """The Dask keys of the large data (1 MB or more) this call's worker holds
    while it runs: where an argument that travelled once is kept."""
    from distributed import get_worker

    state = get_worker().state
    return tuple(sorted(
        key for key, task in list(state.tasks.items())
        if task.state == "memory" and (task.nbytes or 0) >= 1_000_000
    ))


def change_in_place_and_sum(array, _: object = None) -> float:
    """Double the array it is given, in place, and return the new sum."""
    array *= 2
    return float(array.sum())


def sum_when_released(array, release: str, deadline: float = 30.0) -> float:
    """Hold on to the array until the file ``release`` exists; return its sum."""
    wait_for_file(release, deadline)
    return float(array.sum())


def size_when_released(data: bytes, release: str, deadline: float = 30.0) -> int:
    """Hold on to ``data`` until the file ``release`` exists; return its size."""
    wait_for_file(release, deadline)
    return len(data)


def numpy_global_random() -> float:
    """A draw from numpy's global generator, which a fork would duplicate."""
    import numpy

    return float(numpy.random.random())


def current_task_key(_: object = None, delay: float = 0.0) -> str:
    """The key of the Dask task (or batch) running this call (after ``delay`` seconds)."""
    from distributed import get_worker

    time.sleep(delay)
    return str(get_worker().get_current_task())


def exit_at(x: int, doomed: int) -> int:
    """``x``, except that item ``doomed`` ends its worker process."""
    if x == doomed:
        os._exit(13)
    return x


def refuse_to_unpickle(why: str) -> None:
    raise ValueError(f"cannot be unpickled here: {why}")


class UnpicklesOnlyOnTheClient:
    """Pickles anywhere; unpickling it in a worker raises ``ValueError``."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (refuse_to_unpickle, ("on purpose",))


def sum_of_squares_through_worker_client(n: int) -> int:
    """Submit ``square`` over ``range(n)`` from inside a task, Dask's way."""
    from distributed import worker_client

    with worker_client() as client:
        return sum(client.gather(client.map(square, range(n))))


def sleep_then_size(seconds: float, data) -> int:
    time.sleep(seconds)  # stands for work
    return len(data)


def shared_bytes_on_scheduler(dask_scheduler=None) -> int:
    """Run on the scheduler: bytes held under the executor's shared keys."""
    return sum(ts.nbytes for key, ts in dask_scheduler.tasks.items()
               if str(key).startswith("sulis-shared-") and ts.state == "memory")


#: Stops process ARGV[1] once it has written 10 MB more than when this
#: started (it is sending a result), for ARGV[2] seconds, then lets it go on.
_STALLER = """
import os, signal, sys, time
pid, stall = int(sys.argv[1]), float(sys.argv[2])
def written():
    with open(f"/proc/{pid}/io") as io:
        return int(next(line for line in io if line.startswith("wchar:")).split()[1])
start, deadline = written(), time.monotonic() + 60
while written() - start < 10_000_000:
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.002)
os.kill(pid, signal.SIGSTOP)
time.sleep(stall)
os.kill(pid, signal.SIGCONT)
"""


def result_sent_slowly(nbytes: int, stall: float) -> bytes:
    """A result of ``nbytes`` whose worker stops for ``stall`` seconds in
    the middle of sending it: a fetch that takes that long, for real."""
    import subprocess
    import sys

    subprocess.Popen([sys.executable, "-c", _STALLER, str(os.getpid()), str(stall)])
    return b"\x01" * nbytes


def pid_after(_: object = None, delay: float = 0.0) -> int:
    """This process's pid, after ``delay`` seconds."""
    time.sleep(delay)  # stands for work
    return os.getpid()


def numpy_random_state(_: object = None, delay: float = 0.0) -> tuple[int, int]:
    """``(pid, a fingerprint of numpy's global random state)``, drawing
    nothing, after ``delay`` seconds (so that calls spread over processes)."""
    import numpy

    time.sleep(delay)
    return os.getpid(), int(numpy.random.get_state()[1][:8].sum())


def meet(directory: str, name: str, parties: int, timeout: float = 15.0) -> int:
    """A barrier across processes: mark ``name`` arrived in ``directory``,
    then wait until ``parties`` have, or until ``timeout`` passes, or until
    another party gave up; return how many had arrived. The first to give
    up says so, so that calls run one after another fail fast."""
    Path(directory, f"arrived-{name}").touch()
    deadline = time.monotonic() + timeout
    while True:
        arrived = sum(1 for entry in os.listdir(directory) if entry.startswith("arrived-"))
        if arrived >= parties or os.path.exists(os.path.join(directory, "gave-up")):
            return arrived
        if time.monotonic() > deadline:
            Path(directory, "gave-up").touch()
            return arrived
        time.sleep(0.005)
