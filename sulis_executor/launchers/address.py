"""``launch='address'``: attach to a scheduler that is already running.

The cluster belongs to somebody else, so closing detaches and stops nothing.
"""

from __future__ import annotations

from ..config import ExecutorOptions
from .base import Cluster, Launcher


class AddressLauncher(Launcher):
    name = "address"

    def __init__(self, options: ExecutorOptions, security: object = None) -> None:
        if not options.address:
            raise ValueError("launch='address' needs address='tcp://host:port'")
        self._address = options.address
        self._security = security
        self._min_workers = options.wait_for_workers

    def start(self, timeout: float) -> Cluster:
        minimum = self._min_workers if isinstance(self._min_workers, int) else 0
        return Cluster(
            target=self._address,
            security=self._security,
            min_workers=minimum,
            description=f"the scheduler at {self._address}",
        )

    def close(self, timeout: float) -> None:
        pass
