"""Starting the executor's cluster and connecting to it: what
``SulisDaskExecutor()`` does before it has an engine.

The launcher starts the cluster (or finds it); a client connects, the
workers are waited for and checked to run our version, and an
:class:`~._engine.Engine` takes over. Every step counts against the one
``timeout``, and whatever fails on the way closes what was started, whatever
is raised (Ctrl-C and SIGTERM too): no worker is left behind.

Kept apart from ``executor``, whose class is the public API: this is the
private machinery that runs once, in its constructor.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from . import _dask_private, _remote
from ._engine import Engine
from ._security import DeferredSecurity
from ._signals import leave_signals_to_main_thread
from ._versions import check_workers, raise_if_refused
from ._walltime import Walltime
from .config import ExecutorOptions
from .errors import ClusterStartupTimeout
from .launchers._existing import PublishedLauncher
from .launchers._scheduler import in_process_scheduler
from .launchers.base import Cluster, Launcher

logger = logging.getLogger("sulis_executor")


#: Modes in which the executor starts the cluster, and so makes its credentials.
SELF_STARTED_MODES = ("local", "srun", "mpi")


def job_security(mode: str, options: ExecutorOptions) -> Any:
    """The ``distributed.Security`` for this cluster, or ``None`` for plain TCP.

    A cluster we start gets TLS with credentials made for it alone. For a
    cluster someone else started, ``None`` lets Dask use its own
    configuration (``distributed.comm.tls.*``), unless a ``Security`` object
    was given.
    """
    if options.security is False:
        return None
    if options.security is True:
        if mode in SELF_STARTED_MODES:
            from ._security import generate_credentials, security_from

            return security_from(generate_credentials())
        return None
    return options.security


def launch_security(mode: str, options: ExecutorOptions) -> Any:
    """What the launcher of ``mode`` is given as the cluster's security (see
    ``job_security``)."""
    if mode in ("local", "srun"):
        # Made once the workers are on their way (see DeferredSecurity).
        return DeferredSecurity(lambda: job_security(mode, options))
    return job_security(mode, options)


def start_engine(launcher: Launcher, options: ExecutorOptions, walltime: Walltime,
                 initializer: Callable[..., object] | None, initargs: tuple[Any, ...]) -> Engine:
    """Start ``launcher``'s cluster, connect to it, wait for its workers,
    and return the engine that runs calls on it; close what was started
    if anything fails."""
    from distributed import Client

    started = time.monotonic()
    deadline = started + options.timeout
    try:
        cluster = launcher.start(options.timeout)
        try:
            if isinstance(cluster.target, str):
                _probe(cluster.target, cluster.security, max(1.0, deadline - time.monotonic()))
            # Its event loop's thread, if it starts one, leaves signals
            # to the main thread (see _signals); the probe has shown the
            # scheduler answers, so this takes milliseconds.
            with leave_signals_to_main_thread():
                _dask_private.start_offload_thread()
                client = Client(
                    cluster.target,
                    security=cluster.security,
                    timeout=max(1.0, deadline - time.monotonic()),
                    set_as_default=True,
                )
        except (OSError, TimeoutError, TypeError) as error:
            raise _connect_error(cluster, options.timeout, error) from error
    except BaseException:  # Ctrl-C or SIGTERM too: never leave workers behind
        launcher.close(timeout=10)
        raise
    token = uuid.uuid4().hex
    published: Any = launcher
    try:
        if initializer is not None:
            client.register_plugin(
                _remote.InitializerPlugin(initializer, initargs),
                name=_remote.initializer_plugin_name(token),
            )
        if cluster.min_workers:
            _wait_for_workers(client, cluster, deadline)
        _check_versions(client, cluster, deadline)
        # While open, Dask's config names this cluster: Client() joins it.
        published = PublishedLauncher(launcher, client)
        engine = Engine(client, published, token, initializer is not None,
                        cluster.workers_reachable, cluster.shared_directory,
                        one_call_per_task=options.max_tasks_per_child is not None,
                        scheduler=in_process_scheduler(cluster.target),
                        walltime=walltime)
        try:
            if cluster.expected_members:
                _wait_for_members(engine, cluster, deadline)
        except BaseException:
            engine.close(timeout=10)  # the client and the cluster with it
            raise
    except BaseException:
        client.close()
        published.close(timeout=10)
        raise
    logger.info(
        "%s ready: %d workers in %.2f s",
        cluster.description,
        _dask_private.worker_count(client),
        time.monotonic() - started,
    )
    return engine


def _probe(address: str, security: Any, timeout: float) -> None:
    """Connect once to ``address`` and hang up, on a private event loop.

    A ``distributed.Client`` whose constructor fails to connect is left for
    the garbage collector, and its ``__del__`` can deadlock on Dask's loop
    lock when that runs at the wrong moment; so we find out first, with no
    client to leave behind. Raises what connecting raises.
    """
    import asyncio

    from distributed.comm import connect

    async def attempt() -> None:
        args = security.get_connection_args("client") if security is not None else {}
        comm = await connect(address, timeout=timeout, **args)
        await comm.close()

    # In a thread of its own: the caller may already run an event loop
    # (a notebook does), where asyncio.run would refuse.
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(attempt())
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=run, name="sulis-executor-probe", daemon=True)
    with leave_signals_to_main_thread():
        thread.start()
    thread.join(timeout + 5)
    if outcome:
        raise outcome[0]
    if thread.is_alive():
        raise TimeoutError(f"no answer from {address} within {timeout:g} s")


def _connect_error(cluster: Any, timeout: float, error: BaseException) -> Exception:
    """Say which scheduler could not be reached, and what to check."""
    where = cluster.description or str(cluster.target)
    if isinstance(error, TypeError) and "TLS" in str(error):
        return ValueError(
            f"{where} requires TLS, and no credentials were given: pass "
            f"security=distributed.Security(...) with that cluster's certificates"
        )
    return ClusterStartupTimeout(
        f"could not connect to {where} within {timeout:g} s ({error}); check that the "
        f"scheduler is running and reachable from here, or raise timeout="
    )


def _wait_for_members(engine: Engine, cluster: Cluster, deadline: float) -> None:
    """Wait until the nodes' pools have ``expected_members`` members in
    all (each member joins its agent once it has started)."""
    count = cluster.expected_members
    while engine.worker_count() < count:
        if time.monotonic() > deadline:
            raise ClusterStartupTimeout(
                f"only {engine.worker_count()} of the {count} worker processes of "
                f"{cluster.description} started before the timeout; check the job's output "
                f"for errors, or raise timeout="
            )
        time.sleep(0.005)


def _wait_for_workers(client: Any, cluster: Cluster, deadline: float) -> None:
    count = cluster.min_workers
    # A scheduler in this process is watched directly: Client.wait_for_workers
    # asks the scheduler every 0.1 s, a tenth of a second of start-up time.
    scheduler = getattr(cluster.target, "scheduler", None)
    try:
        if scheduler is not None and hasattr(scheduler, "workers"):
            while len(scheduler.workers) < count:
                raise_if_refused(scheduler)  # a worker of another version
                if time.monotonic() > deadline:
                    raise TimeoutError
                time.sleep(0.005)
        else:
            client.wait_for_workers(count, timeout=max(0.1, deadline - time.monotonic()))
    except TimeoutError:
        arrived = _dask_private.worker_count(client)
        raise ClusterStartupTimeout(
            f"only {arrived} of {count} workers of {cluster.description} arrived before the "
            f"timeout; check the workers' output for errors, that they can reach the "
            f"scheduler on the chosen interface, or raise timeout="
        ) from None


def _check_versions(client: Any, cluster: Cluster, deadline: float) -> None:
    """Raise ``VersionMismatchError`` if a worker runs another version:
    one our scheduler refused, or one of a cluster someone else runs."""
    scheduler = in_process_scheduler(cluster.target)
    if scheduler is not None:
        raise_if_refused(scheduler)
        return
    timeout = max(1.0, deadline - time.monotonic())
    try:
        check_workers(client, timeout)
    except TimeoutError:
        raise ClusterStartupTimeout(
            f"the workers of {cluster.description} did not say which version of "
            f"sulis_executor they run within {timeout:g} s; check that they are "
            "responsive, or raise timeout="
        ) from None
