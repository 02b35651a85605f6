"""The small interface every launch mode implements.

A launcher gets a Dask scheduler to talk to, one way or another, and tears
down whatever it started. The executor only ever sees a :class:`Cluster`.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Cluster:
    """What a launcher hands to the executor.

    ``target`` is what :class:`distributed.Client` connects to: a scheduler
    address, or an in-process cluster object that shares its event loop.
    ``expected_workers`` is how many workers the launcher promised; the
    executor waits for ``min_workers`` of them before returning, and, on a
    cluster of nodes with pools (see ``_agent``), until ``expected_members``
    members in all have joined them.
    ``workers_reachable`` says this process can connect to the workers
    directly (true when the launcher started them on this job's network), so
    large data can skip the hop through the scheduler. ``shared_directory``
    is a private directory on this machine that every worker can read (when
    all of them run here), through which large arguments travel as files.
    """

    target: Any
    security: Any = None
    expected_workers: int | None = None
    min_workers: int = 0
    expected_members: int = 0
    description: str = ""
    workers_reachable: bool = False
    shared_directory: str | None = None


class Launcher(abc.ABC):
    """Start (or find) a cluster, then close what was started."""

    #: The name used for ``launch=`` and in logs.
    name: str = ""

    @abc.abstractmethod
    def start(self, timeout: float) -> Cluster:
        """Return a cluster to connect to, within ``timeout`` seconds or raise."""

    @abc.abstractmethod
    def close(self, timeout: float) -> None:
        """Stop what :meth:`start` started; safe to call more than once."""

    def ready(self, client: Any) -> None:  # noqa: B027 - most launchers need nothing here
        """The executor's ``client`` is connected and has its workers."""

    def signal_workers(self, signum: int) -> bool:
        """Send ``signum`` to every worker process this launcher started, and
        start no new ones. ``False`` when it started none it may signal:
        workers someone else runs, or MPI ranks, whose death ends the job."""
        return False

    def dashboard_link(self) -> str | None:
        return None
