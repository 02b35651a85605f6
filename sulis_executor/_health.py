"""Whether the executor's cluster is still there to run anything.

The engine's collector asks every half second it is idle, and whenever Dask
cancels one of its tasks (only the client does, when the scheduler is gone).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ClusterHealth:
    def __init__(self, client: Any, launcher: Any, closed: Callable[[], bool]) -> None:
        self._client = client
        self._launcher = launcher
        self._closed = closed
        self.address = getattr(getattr(client, "scheduler", None), "address", "(unknown)")

    def scheduler_lost(self) -> bool:
        # Dask's client moves to "connecting" the moment its connection to the
        # scheduler drops, and tries to reconnect for its whole timeout; work
        # in flight is gone by then, so we do not wait for that verdict.
        return not self._closed() and self._client.status not in ("running", "newly-created")

    def problem(self) -> str | None:
        """Why no call can run any more; ``None`` while the cluster is fine."""
        if self.scheduler_lost():
            return f"lost the connection to the Dask scheduler at {self.address}"
        # A launcher that can tell its workers are gone for good (the srun
        # step ended: scancel, or every worker killed) breaks us at once.
        gone = getattr(self._launcher, "workers_gone", None)
        if gone is not None and gone():
            return "the srun step running the workers has ended; no worker will come back"
        return None
