"""``launch='local'``: a cluster of worker processes on this machine.

This is what runs on a laptop, and wherever no SLURM allocation is found.
The scheduler runs in this process; the machine is one node (see
``_agent`` and ``_pool``): one Dask worker, the agent, and ``max_workers``
member processes that run the calls, like ``ProcessPoolExecutor``'s
workers, each restarted if it dies. On Linux they are forked from a fork
server, which imports Dask once for them all (see
:mod:`sulis_executor._forkserver` for why, and why not from this process);
elsewhere each is a fresh interpreter (see :mod:`sulis_executor.worker`).
Everything binds to loopback unless an interface is named: a local cluster
has no business listening on the network.
"""

from __future__ import annotations

import os
from typing import Any

from .._security import CredentialsFile, credentials_of, process_authkey, resolve_security
from .._shared import SharedDirectory
from ..config import ExecutorOptions
from ._network import validate_interface
from ._processes import WorkerProcesses, pythonpath_env, worker_args
from ._resources import worker_flags
from ._scheduler import start_scheduler
from .base import Cluster, Launcher


def default_worker_count() -> int:
    """The CPUs this process may use, as ``ProcessPoolExecutor`` counts them."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class LocalLauncher(Launcher):
    name = "local"

    def __init__(self, options: ExecutorOptions, security: object = None) -> None:
        self._options = options
        self._security = security
        self._cluster: Any = None
        self._workers: WorkerProcesses | None = None
        self._credentials: CredentialsFile | None = None
        self._shared: SharedDirectory | None = None
        self.n_workers = options.max_workers or default_worker_count()

    def start(self, timeout: float) -> Cluster:
        options = self._options
        if options.interface:
            validate_interface(options.interface)
        # Workers first: starting an interpreter and importing Dask (the
        # fork server's, or each worker's) is most of the start-up time, so
        # it happens while the scheduler starts; workers then read its
        # address from their standard input.
        # An interface is in the shared flags; without one, bind to loopback.
        extra = worker_flags(options, None) + ([] if options.interface else ["--host", "127.0.0.1"])
        # The private directory holds the pool's socket, and shared buffers.
        self._shared = SharedDirectory()
        pool = os.path.join(self._shared.path, "pool")
        agent = [*extra, "--pool", str(self.n_workers), "--pool-socket", pool]
        member = ["--member", pool]
        if options.max_tasks_per_child is not None:
            member += ["--max-tasks", str(options.max_tasks_per_child)]

        def args_for(slot: int, generation: int) -> list[str]:
            # Slot 0: the agent (a Dask worker); then the members.
            if slot == 0:
                return worker_args("-", f"local-{generation}", agent)
            return worker_args("-", f"local-{slot - 1}-{generation}", member)

        self._workers = WorkerProcesses(
            1 + self.n_workers, args_for, env=pythonpath_env(),
            # mp_context "spawn": fresh interpreters, as multiprocessing's spawn.
            fork=options.mp_context != "spawn",
        )
        self._workers.start()
        # The credentials, made while the workers start (see DeferredSecurity).
        self._security = resolve_security(self._security)
        # Loopback unless an interface is named: a local cluster has no
        # business listening on the network.
        cluster = start_scheduler(options, self._security, None if options.interface else "127.0.0.1")
        self._cluster = cluster
        greeting: dict[str, Any] = {
            "scheduler": cluster.scheduler_address,
            # Ours to clean up; the workers do it if this process dies first.
            "remove_when_orphaned": [self._shared.path],
            # multiprocessing's key, so that Manager proxies passed to calls
            # can authenticate (see sulis_executor.worker.adopt_authkey).
            "authkey": process_authkey(),
        }
        if self._security is not None:
            self._credentials = CredentialsFile(credentials_of(self._security))
            greeting["security_file"] = self._credentials.path
            greeting["remove_when_orphaned"].append(self._credentials.directory)
        self._workers.greet(greeting)
        return Cluster(
            target=self._cluster,
            security=self._security,
            expected_workers=1,
            min_workers=1,
            expected_members=self.n_workers,
            description=f"a local cluster of {self.n_workers} worker processes",
            workers_reachable=True,
            shared_directory=self._shared.path,
        )

    def worker_pids(self) -> list[int]:
        return self._workers.pids() if self._workers is not None else []

    def signal_workers(self, signum: int) -> bool:
        if self._workers is not None:
            self._workers.signal_all(signum)
        return True

    def close(self, timeout: float) -> None:
        workers, self._workers = self._workers, None
        if workers is not None:
            workers.close(timeout=min(timeout, 5.0))
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            cluster.close(timeout=timeout)
        credentials, self._credentials = self._credentials, None
        if credentials is not None:
            credentials.remove()
        shared, self._shared = self._shared, None
        if shared is not None:
            shared.remove()

    def dashboard_link(self) -> str | None:
        if self._cluster is None or not self._options.dashboard:
            return None
        return self._cluster.dashboard_link

