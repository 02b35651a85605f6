"""The scheduler, run inside the executor's own process.

Shared by every mode in which the executor starts its cluster (local, srun,
mpi), so they agree on the details that matter:

* ``worker-saturation`` is 1.0: a task goes to a worker only when a thread
  is free. Dask's default (1.1) lets a single-threaded worker hold a second
  task behind the running one, so a short call can wait behind a long one
  while another worker idles; ``ProcessPoolExecutor`` never does that. The
  executor keeps the next batches ready in the scheduler's queue instead.
* The active memory manager is off, so an input shared by many tasks stays
  on each worker that fetched it instead of being fetched again.
* Messages to workers and clients are batched every 1 ms, not 5 and 2 ms:
  a task handed to a worker, or a result announced to the client, waits out
  that interval, and executor calls are latency-bound.
  (The workers we start answer at 1 ms too; see ``sulis_executor.worker``.)
* The nodes' agents (see ``_agent``) report to it on their streams, and
  the executor's engine in this process (``Feeder``) answers with batches
  on the same streams; a worker that leaves gives back what its node held.
* Workers running another version of this package are refused as they
  register (see ``_versions``).
* TLS when a ``Security`` is given, and random ports only. Dask's HTTP
  server, plain and unauthenticated, serves ``/health`` alone on loopback
  unless the dashboard is asked for (see ``_network.HTTP_HOST``), whatever
  address the comms bind; the dashboard binds the scheduler's own host (or
  what is asked for), never Dask's shared port 8787 on every interface.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import dask.config

from .. import _dask_private
from .._quiet import NO_STALL_CHECK
from .._signals import leave_signals_to_main_thread
from ..config import ExecutorOptions

#: Seconds between the batched sends of the scheduler's messages to a worker.
STREAM_INTERVAL = 0.001


def _executor_streams() -> Any:
    from distributed.diagnostics.plugin import SchedulerPlugin

    from .._agent import AGENT_OP

    class ExecutorStreams(SchedulerPlugin):
        """Shorten the batching interval of each worker's and client's
        stream as it joins, and pass what the nodes' agents report to the
        executor's engine (see ``_agent``)."""

        name = STREAMS_PLUGIN

        def __init__(self) -> None:
            self._scheduler: Any = None
            # The engine that hands batches to this cluster's agents, and
            # each agent's members, as last reported (for an engine that
            # comes after its agents: see register_feeder).
            self.feeder: Feeder | None = None
            self.members: dict[str, int] = {}

        async def start(self, scheduler: Any) -> None:
            self._scheduler = scheduler
            _dask_private.add_stream_handler(scheduler, AGENT_OP, self._agent_event)

        def _agent_event(self, event: str, worker: str = "", **message: Any) -> None:
            # A node's agent reports (see _agent).
            if event == "members":
                self.members[worker] = message["members"]
            if self.feeder is not None:
                self.feeder.agent_event(worker, event, **message)

        def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
            self.members.pop(worker, None)
            if self.feeder is not None:
                self.feeder.worker_lost(worker)

        def add_worker(self, scheduler: Any, worker: str) -> None:
            _dask_private.shorten_worker_stream_on_scheduler(scheduler, worker, STREAM_INTERVAL)

        def add_client(self, scheduler: Any, client: str) -> None:
            # The client's stream is made just after this hook returns.
            asyncio.get_running_loop().call_soon(self._shorten_client_stream, scheduler, client)

        @staticmethod
        def _shorten_client_stream(scheduler: Any, client: str) -> None:
            _dask_private.shorten_client_stream_on_scheduler(scheduler, client, STREAM_INTERVAL)

    return ExecutorStreams()


class Feeder(Protocol):
    """What hands batches to the nodes' agents (the executor's engine)."""

    def agent_event(self, worker: str, event: str, key: str | None = None,
                    payload: bytes | None = None, members: int = 0) -> None: ...

    def worker_lost(self, worker: str) -> None: ...


def send_handouts(scheduler: Any, handouts: dict[str, list[Any]]) -> None:
    """Send agents their batches (on the scheduler's event loop)."""
    from .._agent import HANDOUT_OP

    for worker, batches in handouts.items():
        try:
            # (A worker gone: Feeder.worker_lost takes back what it had.)
            _dask_private.send_to_worker(scheduler, worker, {"op": HANDOUT_OP, "batches": batches})
        except Exception:
            pass


#: The scheduler plugin's name (see _executor_streams).
STREAMS_PLUGIN = "sulis-executor-streams"


def register_feeder(scheduler: Any, feeder: Feeder | None) -> None:
    """Have ``feeder`` hear what the agents of ``scheduler``'s cluster
    report (``None``: nobody, any more), starting with their members so far
    (on the scheduler's event loop)."""
    plugin = scheduler.plugins.get(STREAMS_PLUGIN)
    if plugin is None:
        return

    def register() -> None:
        plugin.feeder = feeder
        if feeder is not None:
            for worker, members in plugin.members.items():
                feeder.agent_event(worker, "members", members=members)

    try:
        scheduler.loop.add_callback(register)
    except RuntimeError:  # the loop is closed: nothing will report
        pass


def in_process_scheduler(target: Any) -> Any:
    """The scheduler an executor started in this process, which can hand
    batches to agents, or ``None``."""
    scheduler = getattr(target, "scheduler", None)
    from .._agent import AGENT_OP

    return scheduler if _dask_private.has_stream_handler(scheduler, AGENT_OP) else None


def start_scheduler(options: ExecutorOptions, security: Any, host: str | None) -> Any:
    """Start a scheduler (as a worker-less ``LocalCluster``) bound to ``host``
    (or ``options.interface`` when ``host`` is ``None``)."""
    from distributed import LocalCluster

    from .._versions import version_gate
    from ._network import HEALTH_ROUTES, HTTP_HOST

    bind: dict[str, Any] = {"host": host} if host else {"interface": options.interface}
    http: dict[str, Any] = {}
    if options.dashboard:
        # ":port" alone would bind every interface; keep it on our host.
        dashboard = options.dashboard
        if dashboard.startswith(":"):
            dashboard = f"{host or HTTP_HOST}{dashboard}"
        scheduler_kwargs: dict[str, Any] = {}
    else:
        # Not on the comms' address: nobody else needs it (see _network).
        dashboard = None
        scheduler_kwargs = {"dashboard_address": f"{HTTP_HOST}:0"}
        http = {"distributed.scheduler.http.routes": list(HEALTH_ROUTES)}
    scheduler_kwargs["plugins"] = [_executor_streams(), version_gate()]
    quiet = {} if options.verbose else NO_STALL_CHECK
    # Its event loop's thread, and the threads that loop starts, leave
    # signals to our main thread; starting it takes about 10 ms.
    with leave_signals_to_main_thread(), dask.config.set({
        **quiet,
        **http,
        "distributed.scheduler.worker-saturation": 1.0,
        # The active memory manager drops "extra" replicas every 2 s, which
        # would make workers fetch a shared input (see _shared) again and
        # again; the executor bounds what it keeps on the cluster itself.
        "distributed.scheduler.active-memory-manager.start": False,
    }):
        cluster = LocalCluster(
            n_workers=0,
            processes=True,
            scheduler_port=0,
            dashboard_address=dashboard,
            silence_logs=logging.INFO if options.verbose else logging.CRITICAL,
            security=security,
            protocol="tls://" if security is not None else "tcp://",
            scheduler_kwargs=scheduler_kwargs,
            **bind,
        )
    # Ctrl-C must reach the user's code: see _dask_private.keep_signals_out_of_gc.
    _dask_private.keep_signals_out_of_gc()
    return cluster
