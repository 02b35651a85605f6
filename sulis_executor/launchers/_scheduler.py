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
* Results that tasks push on their worker's stream are forwarded to the
  client's stream when the task is done, saving the client two round trips
  to fetch each one (see ``_remote.send_back``).
* Runners (``_remote.run_pulled``) ask it for their next batch, which the
  executor's engine in this process hands out (``Feeder``); a worker that
  leaves gives the batches its runners held back to the engine.
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

from .._quiet import NO_STALL_CHECK
from .._signals import leave_signals_to_main_thread
from ..config import ExecutorOptions

#: Seconds between the batched sends of the scheduler's messages to a worker.
STREAM_INTERVAL = 0.001


def _executor_streams() -> Any:
    from distributed.diagnostics.plugin import SchedulerPlugin

    from .._remote import PULL_OP, RESULT_OP

    class ExecutorStreams(SchedulerPlugin):
        """Shorten the batching interval of each worker's and client's
        stream as it joins, and forward the results that tasks push to the
        clients that submitted them (see ``_remote.send_back``)."""

        name = "sulis-executor-streams"

        def __init__(self) -> None:
            self._scheduler: Any = None
            # Pushed results whose tasks the scheduler has not yet heard end.
            self._pushed: dict[str, tuple[str, bytes]] = {}

        async def start(self, scheduler: Any) -> None:
            self._scheduler = scheduler
            scheduler.stream_handlers[RESULT_OP] = self._hold_result
            scheduler.stream_handlers[PULL_OP] = self._hand_out

        def _hand_out(self, engine: str, runner: str, key: str | None = None,
                      payload: bytes | None = None, failed: bool = False, more: bool = True,
                      returned: str | None = None, worker: str = "", **_: Any) -> None:
            # A runner asks for its next batch (see _remote.run_pulled).
            feeder = _feeders.get(engine)
            if feeder is None:
                send_handout(self._scheduler, worker, engine, runner, None)
                return
            if returned is not None:
                feeder.handout_returned(returned)
            # No new batch for a worker that is gone: nothing would run it.
            more = more and worker in self._scheduler.stream_comms
            handout = feeder.hand_out(worker, runner, key, payload, failed, more)
            if handout is not PARKED:
                send_handout(self._scheduler, worker, engine, runner, handout)

        def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
            for feeder in list(_feeders.values()):
                feeder.worker_lost(worker)

        def _hold_result(self, client: str, key: str, payload: bytes, **_: Any) -> None:
            # A result arrives just before its task's "finished" message.
            # Forwarding it at once would have the client react (submit more
            # work, release the task) while the scheduler still has to hand
            # the freed worker its next task. So it goes on when the task is
            # done (``transition`` below), right after the next task has been
            # handed out. On a single-worker cluster, the median gap between
            # tasks was 3.1 ms without pushing, 4.4-5.0 ms forwarding at once
            # and 3.4-3.9 ms forwarding here (deferring it further did not
            # help); pushing still wins overall (see the README).
            self._pushed[key] = (client, payload)

        def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
            if key not in self._pushed:
                return
            if finish == "memory":
                client, payload = self._pushed.pop(key)
                stream = self._scheduler.client_comms.get(client)
                if stream is not None:  # else the client fetches it, if it is still there
                    try:
                        stream.send({"op": RESULT_OP, "key": key, "payload": payload})
                    except Exception:
                        pass
            elif finish in ("released", "forgotten", "erred"):
                del self._pushed[key]

        def add_worker(self, scheduler: Any, worker: str) -> None:
            stream = scheduler.stream_comms.get(worker)
            if stream is not None:
                stream.interval = STREAM_INTERVAL

        def add_client(self, scheduler: Any, client: str) -> None:
            # The client's stream is made just after this hook returns.
            asyncio.get_running_loop().call_soon(self._shorten_client_stream, scheduler, client)

        @staticmethod
        def _shorten_client_stream(scheduler: Any, client: str) -> None:
            stream = scheduler.client_comms.get(client)
            if stream is not None:
                stream.interval = STREAM_INTERVAL

    return ExecutorStreams()


#: A batch for a runner: its key, kind, pickled calls (``bytes``, or the file
#: they were shared through) and the files of its shared buffers, in order
#: (see ``_shared.Pickled``; never Dask data, which a runner cannot resolve).
Handout = tuple[str, str, Any, tuple[Any, ...]]
#: ``Feeder.hand_out``'s answer when the runner is to wait for work.
PARKED: Any = object()


class Feeder(Protocol):
    """What hands batches to runners (the executor's engine)."""

    def hand_out(self, worker: str, runner: str, key: str | None, payload: bytes | None,
                 failed: bool, more: bool) -> Handout | None: ...

    def handout_returned(self, key: str) -> None: ...

    def worker_lost(self, worker: str) -> None: ...


def send_handout(scheduler: Any, worker: str, engine: str, runner: str,
                 handout: Handout | None) -> None:
    """Answer a runner (on the scheduler's event loop): its next batch, or
    ``None`` to end it."""
    from .._remote import HANDOUT_OP

    stream = scheduler.stream_comms.get(worker)
    if stream is None:
        return  # gone: Feeder.worker_lost takes back what it had
    key, kind, payload, shared = handout if handout is not None else (None, None, None, ())
    try:
        stream.send({"op": HANDOUT_OP, "engine": engine, "runner": runner, "key": key,
                     "kind": kind, "payload": payload, "shared": list(shared)})
    except Exception:
        pass


#: The engines whose runners ask the schedulers in this process for batches.
_feeders: dict[str, Feeder] = {}


def register_feeder(engine: str, feeder: Feeder) -> None:
    _feeders[engine] = feeder


def unregister_feeder(engine: str) -> None:
    _feeders.pop(engine, None)


def in_process_scheduler(target: Any) -> Any:
    """The scheduler an executor started in this process, which can hand
    batches to runners, or ``None``."""
    scheduler = getattr(target, "scheduler", None)
    handlers = getattr(scheduler, "stream_handlers", None)
    from .._remote import PULL_OP

    return scheduler if isinstance(handlers, dict) and PULL_OP in handlers else None


def forwards_results(client: Any, target: Any) -> bool:
    """Whether the scheduler forwards the results that tasks push: one that
    an executor started (``target`` is the launcher's ``Cluster.target``).
    A scheduler in this process is looked at; another is asked, and one
    that cannot answer (it cannot import this package) does not forward."""
    scheduler = getattr(target, "scheduler", None)
    if scheduler is not None and hasattr(scheduler, "stream_handlers"):
        return _has_result_forwarding(scheduler)
    try:
        return bool(client.run_on_scheduler(_has_result_forwarding))
    except Exception:
        return False


def _has_result_forwarding(dask_scheduler: Any = None) -> bool:
    from .._remote import RESULT_OP

    return RESULT_OP in getattr(dask_scheduler, "stream_handlers", {})


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
        return LocalCluster(
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
