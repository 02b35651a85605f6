"""``launch='attach'``: join the Dask cluster this process already uses.

``launch='auto'`` picks it when ``dask_mpi.initialize()`` has run, when a
``distributed.Client`` of the user's is open, or when Dask's config names a
scheduler (see :mod:`._existing`, which also says why the executor quiets
the cluster's processes that belong to its job, and takes over dask-mpi's
exit hook). The
cluster belongs to whoever started it: the executor waits for the workers
it can expect, and closing detaches and stops nothing.
"""

from __future__ import annotations

import os
from typing import Any

from ..config import ExecutorOptions
from ._existing import (
    ExistingCluster,
    find_existing_cluster,
    min_workers_for,
    quiet_this_jobs_processes,
    take_over_dask_mpi_exit,
)
from .base import Cluster, Launcher


class AttachLauncher(Launcher):
    name = "attach"

    def __init__(self, options: ExecutorOptions, security: object = None,
                 existing: ExistingCluster | None = None) -> None:
        found = existing if existing is not None else find_existing_cluster(os.environ)
        if found is None:
            raise ValueError(
                "launch='attach' joins the Dask cluster this process already uses, and there is "
                "none: dask_mpi.initialize() has not run, no distributed.Client is open, and "
                "Dask's config names no scheduler (scheduler-address). Set one of those up first, "
                "or use launch='auto' to start a cluster"
            )
        self._existing = found
        # A Security given to the executor wins; else what reaches the cluster now.
        self._security = security if security is not None else found.security
        self._min_workers = min_workers_for(options.wait_for_workers, found.expected_workers)
        self._verbose = options.verbose

    def start(self, timeout: float) -> Cluster:
        return Cluster(
            target=self._existing.address,
            security=self._security,
            expected_workers=self._existing.expected_workers,
            min_workers=self._min_workers,
            description=self._existing.description,
        )

    def ready(self, client: Any) -> None:
        quiet_this_jobs_processes(client, self._existing, self._verbose)
        if self._existing.kind == "dask_mpi":
            take_over_dask_mpi_exit(self._existing.address, self._security)

    def close(self, timeout: float) -> None:
        pass  # the cluster belongs to whoever started it: detach only
