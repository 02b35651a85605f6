"""``launch='scheduler_file'``: attach to a cluster started by a job script.

The classic recipe::

    dask scheduler --scheduler-file $F &
    srun dask worker --scheduler-file $F &
    python script.py          # SulisDaskExecutor(scheduler_file=F)

The scheduler writes ``F`` (JSON with its ``address``) once it listens, so
the file may not exist yet when the script starts: wait for it. A file can
also be left over from a cluster that died, so an address is trusted only
once something answers on it; the file is re-read on every attempt, in case
a new scheduler rewrites it meanwhile. Workers are waited for by the
executor (``Cluster.min_workers``). The cluster belongs to the job script, so
closing detaches and stops nothing.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

from ..config import ExecutorOptions
from ..errors import ClusterStartupTimeout
from ..slurm import SlurmAllocation
from .base import Cluster, Launcher

POLL_INTERVAL = 0.1


def read_address(path: str) -> str | None:
    """The scheduler address in ``path``, or None while it is missing or
    incomplete (the scheduler may be writing it right now)."""
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError):
        return None
    address = data.get("address") if isinstance(data, dict) else None
    return address if isinstance(address, str) and address else None


def answers(address: str, timeout: float) -> bool:
    """True if something accepts TCP connections at ``address``."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.hostname is None or parts.port is None:
        return False
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=timeout):
            return True
    except OSError:
        return False


def expected_workers(wait_for_workers: float | int | None, environ: Mapping[str, str]) -> int:
    """Workers to wait for: ``wait_for_workers`` if a count; else the SLURM
    tasks of the allocation (all of them, or that fraction); else none."""
    if isinstance(wait_for_workers, int):
        return wait_for_workers
    allocation = SlurmAllocation.from_environ(environ)
    if allocation is None:
        return 0
    # The job's tasks, as SLURM_NTASKS says in the batch script (one
    # `srun dask worker` per task is the recipe).
    tasks = environ.get("SLURM_NTASKS", "").strip()
    ntasks = int(tasks) if tasks.isdigit() else allocation.ntasks
    if isinstance(wait_for_workers, float):
        return max(1, math.ceil(wait_for_workers * ntasks))
    return ntasks


class SchedulerFileLauncher(Launcher):
    name = "scheduler_file"

    def __init__(self, options: ExecutorOptions, security: object = None,
                 environ: Mapping[str, str] | None = None) -> None:
        if not options.scheduler_file:
            raise ValueError("launch='scheduler_file' needs scheduler_file='path/to/scheduler.json'")
        self._path = os.path.abspath(os.path.expanduser(options.scheduler_file))
        self._security = security
        self._timeout = options.timeout
        self._min_workers = expected_workers(
            options.wait_for_workers, os.environ if environ is None else environ
        )
        self.address: str | None = None

    def start(self, timeout: float) -> Cluster:
        deadline = time.monotonic() + timeout
        address = None
        while True:
            address = read_address(self._path) or address
            if address is not None and answers(address, timeout=min(2.0, max(0.1, deadline - time.monotonic()))):
                break
            if time.monotonic() > deadline:
                raise ClusterStartupTimeout(self._startup_error(address, timeout))
            time.sleep(POLL_INTERVAL)
        self.address = address
        return Cluster(
            target=address,
            security=self._security,
            expected_workers=self._min_workers or None,
            min_workers=self._min_workers,
            description=f"the cluster of scheduler file {self._path} (scheduler at {address})",
        )

    def _startup_error(self, address: str | None, timeout: float) -> str:
        if address is None:
            state = "does not exist" if not os.path.exists(self._path) else "has no scheduler address in it yet"
            return (
                f"scheduler file {self._path} {state} after {timeout:g} s; start the scheduler "
                f"first ('dask scheduler --scheduler-file {self._path} &'), check its output for "
                "errors, that the path is on a file system this node shares, or raise timeout="
            )
        return (
            f"no scheduler answers at {address}, the address in scheduler file {self._path}, "
            f"after {timeout:g} s; the file may be left over from a cluster that has ended. "
            "Check that 'dask scheduler' is running (its output), that this node can reach that "
            "address, or delete the stale file before starting a new scheduler"
        )

    def close(self, timeout: float) -> None:
        pass  # the cluster belongs to the job script: detach only
