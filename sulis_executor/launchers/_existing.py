"""The Dask cluster a process already uses, and the executor's own, in Dask's config.

A script that set Dask up before the executor was dropped in keeps what it
has: ``launch='auto'`` joins that cluster (``launch='attach'``) instead of
starting another. Three things mean there is one, checked in this order:

1. **dask_mpi.initialize() ran.** It starts the scheduler on MPI rank 0 and
   workers on ranks 2 and up, which never return from it; on rank 1 it puts
   the scheduler's address in Dask's config (``scheduler-address``) and
   registers ``dask_mpi.send_close_signal`` to end the cluster at exit. An
   executor constructed after it runs on rank 1 only, and expects the world
   size less 2 workers. Without this, the MPI mode would have rank 1 wait
   for a scheduler address from rank 0, which is busy being dask-mpi's
   scheduler.
2. **A distributed.Client of the user's is open** (the latest default
   client still running): its scheduler, with its security.
3. **Dask's config names a scheduler** (``scheduler-address``, e.g. from
   ``DASK_SCHEDULER_ADDRESS``), which a bare ``Client()`` would join too.

The executors' own clients, and the clusters they started, never count: an
executor opened inside another starts its own cluster, as before (unless
the outer one had joined a cluster: the inner one joins it too).

While open, an executor **publishes** its scheduler in Dask's config, as
``dask_mpi.initialize()`` does, with the TLS credentials of a cluster it
started (in memory: the config keys take PEM text as well as paths), so a
bare ``Client()`` opened inside ``with SulisDaskExecutor()`` joins its
cluster rather than starting a local one. Closing restores the previous
values; executors closed in any order leave the latest one still open
published.

A cluster's scheduler and workers log tracebacks at INFO when it is shut
down under them, as the Sulis page's recipes do with ``client.shutdown()``
(dask-mpi's ranks, and ``dask scheduler``/``dask worker`` alike, print a
dozen). So an executor joining a cluster raises the Dask loggers of the
cluster's processes that belong to this job to CRITICAL, as it does in its
own process (unless ``verbose``): dask-mpi's ranks, or those running in
this SLURM job. Processes of other jobs are left alone.

dask-mpi's own exit hook also waits 30 s, then prints an ``OSError``, when
the script has shut the cluster down already, and otherwise closes the
scheduler under its workers. So an executor joining dask-mpi's cluster
takes over that hook: at exit, once the executor has closed, it asks the
workers to close first, then shuts the scheduler down, and does nothing if
the scheduler is gone. The cluster still ends when dask-mpi would end it, at
exit; the executor never ends it before.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger("sulis_executor")

#: The Dask config key naming a scheduler (``Client()`` reads it too).
ADDRESS_KEY = "scheduler-address"
#: Where ``distributed.Security()`` finds a client's TLS credentials.
TLS_KEYS = {
    "tls_ca_file": "distributed.comm.tls.ca-file",
    "tls_client_cert": "distributed.comm.tls.client.cert",
    "tls_client_key": "distributed.comm.tls.client.key",
}
#: Launch modes in which the executor starts the cluster.
STARTED_BY_EXECUTORS = ("local", "srun", "mpi")
#: Ranks an MPI launcher sets to this process's rank (for the log only).
_MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK")


@dataclasses.dataclass(frozen=True)
class ExistingCluster:
    """A cluster this process already uses, found by :func:`find_existing_cluster`."""

    #: ``"dask_mpi"``, ``"client"`` or ``"config"``: which of the three.
    kind: str
    address: str
    #: What reaches it: the user's client's ``Security``, or ``None`` for
    #: Dask's own config.
    security: Any
    #: Workers it is known to have, or will have (``None``: unknown).
    expected_workers: int | None
    #: Why ``launch='auto'`` joins it, for the log.
    reason: str
    description: str


# -- the executors' own clients and published addresses ----------------------

_own_clients: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()
#: The keys an executor publishes.
_KEYS = (ADDRESS_KEY, *TLS_KEYS.values())


@dataclasses.dataclass
class _Entry:
    token: object
    values: dict[str, Any]
    #: The executor started that cluster.
    own: bool
    #: The published keys' values before this entry was published.
    previous: dict[str, Any]


#: Published entries, oldest first.
_published: list[_Entry] = []


def _own_cluster_addresses() -> set[str]:
    """Schedulers of clusters that open executors started."""
    with _lock:
        return {entry.values[ADDRESS_KEY] for entry in _published if entry.own}


def publish(client: Any, own_cluster: bool) -> object:
    """Mark ``client`` as an executor's own and put its scheduler (and the
    TLS credentials it holds in memory) in Dask's config, until
    :func:`unpublish` is given the token returned. ``own_cluster``: the
    executor started that cluster (no other executor is to join it; one it
    joined stays there to be joined)."""
    import dask.config

    _own_clients.add(client)
    values: dict[str, Any] = dict.fromkeys(_KEYS)
    values[ADDRESS_KEY] = client.scheduler.address
    security = getattr(client, "security", None)
    for field, key in TLS_KEYS.items():
        value = getattr(security, field, None)
        if isinstance(value, str) and value.startswith("-----BEGIN"):
            values[key] = value
    token = object()
    with _lock:
        previous = {key: dask.config.get(key, None) for key in _KEYS}
        _published.append(_Entry(token, values, own_cluster, previous))
        dask.config.set(values)
    return token


def unpublish(token: object) -> None:
    """Take an executor's entry out of Dask's config; idempotent. The latest
    entry's going restores what was there before it; an earlier one's
    passes what it found on to the entry after it."""
    import dask.config

    with _lock:
        index = next((i for i, entry in enumerate(_published) if entry.token is token), None)
        if index is None:
            return
        entry = _published.pop(index)
        if index < len(_published):
            _published[index].previous = entry.previous
        else:
            dask.config.set(entry.previous)


# -- finding a cluster --------------------------------------------------------


def find_existing_cluster(environ: Mapping[str, str]) -> ExistingCluster | None:
    """The cluster this process already uses (see the module docstring), or
    ``None``. Imports nothing new: with no Dask imported there is none."""
    if "dask" not in sys.modules:
        return None
    return _dask_mpi_cluster(environ) or _user_client_cluster() or _config_cluster()


def _config_address() -> str | None:
    import dask.config

    address = dask.config.get(ADDRESS_KEY, None)
    if not isinstance(address, str) or not address or address in _own_cluster_addresses():
        return None
    return address


def _dask_mpi_cluster(environ: Mapping[str, str]) -> ExistingCluster | None:
    if "dask_mpi" not in sys.modules:
        return None
    address = _config_address()
    from . import mpi_world_size

    world = mpi_world_size(environ)
    if address is None or world is None or world[0] < 3:
        return None
    size = world[0]
    rank = next((environ[v] for v in _MPI_RANK_VARS if environ.get(v, "").isdigit()), "1")
    workers = size - 2
    return ExistingCluster(
        kind="dask_mpi",
        address=address,
        security=None,
        expected_workers=workers,
        reason=(
            f"dask_mpi.initialize() ran in this process (MPI rank {rank} of {size}; Dask's "
            f"config holds its scheduler's address, {address}): joining its cluster, with "
            f"its scheduler on rank 0 and {workers} workers on ranks 2 and up, and leaving "
            "its end to dask-mpi, at exit (launch='mpi' sets one rank aside instead of two)"
        ),
        description=f"dask-mpi's cluster of {size} MPI ranks ({workers} workers, scheduler at {address})",
    )


def _user_client_cluster() -> ExistingCluster | None:
    client = _user_client()
    if client is None:
        return None
    address = client.scheduler.address
    cluster = getattr(client, "cluster", None)
    spec = getattr(cluster, "worker_spec", None)
    expected = len(spec) if isinstance(spec, Mapping) else None
    return ExistingCluster(
        kind="client",
        address=address,
        security=getattr(client, "security", None),
        expected_workers=expected,
        reason=(
            f"a distributed.Client is open in this process ({client.id}, scheduler at "
            f"{address}): joining its cluster, and leaving its end to whoever started it "
            "(launch='local', 'srun' or 'mpi' starts one of the executor's own)"
        ),
        description=f"the cluster of the default client (scheduler at {address})",
    )


def _user_client() -> Any:
    """The latest default client that is running and not an executor's."""
    if "distributed" not in sys.modules:
        return None
    from .. import _dask_private

    for client in _dask_private.default_clients():
        if client not in _own_clients and client.status == "running":
            return client
    return None


def _config_cluster() -> ExistingCluster | None:
    address = _config_address()
    if address is None:
        return None
    return ExistingCluster(
        kind="config",
        address=address,
        security=None,
        expected_workers=None,
        reason=(
            f"Dask's config names a scheduler (scheduler-address={address}, e.g. from "
            "DASK_SCHEDULER_ADDRESS), which Client() would join too: joining its cluster, "
            "and leaving its end to whoever started it"
        ),
        description=f"the scheduler at {address}, named by Dask's config",
    )


# -- the joined cluster's processes, and dask-mpi's exit ------------------------


def quiet_this_jobs_processes(client: Any, existing: ExistingCluster, verbose: bool) -> None:
    """Raise the Dask loggers of the joined cluster's scheduler and workers
    to CRITICAL, as in this process (unless ``verbose``), where they belong
    to this job: they write to its output, and log tracebacks at INFO when
    their streams close at shutdown. dask-mpi's ranks are this job's; other
    processes are when they run in this SLURM job (a cluster the batch
    script started). Best effort: a process that cannot run it keeps its logs."""
    if verbose:
        return
    job = None if existing.kind == "dask_mpi" else os.environ.get("SLURM_JOB_ID")
    if existing.kind != "dask_mpi" and not job:
        return
    try:
        client.run_on_scheduler(_silence_if_in_job, job)
        client.run(_silence_if_in_job, job)
    except Exception:
        logger.debug("could not quiet the processes of %s", existing.description, exc_info=True)


def _silence_if_in_job(job: str | None) -> None:
    """Run in the cluster's processes: ``job`` None means all of them."""
    if job is None or os.environ.get("SLURM_JOB_ID") == job:
        from .._quiet import silence_dask_logs

        silence_dask_logs(False)


def take_over_dask_mpi_exit(address: str, security: Any) -> None:
    """Replace ``dask_mpi.send_close_signal`` at exit with
    :func:`end_dask_mpi_cluster` (see the module docstring). Registered now,
    it runs after the executors opened later have closed (``atexit`` runs
    last-in first-out)."""
    dask_mpi = sys.modules.get("dask_mpi")
    send_close_signal = getattr(dask_mpi, "send_close_signal", None)
    if send_close_signal is not None:
        atexit.unregister(send_close_signal)
    atexit.unregister(end_dask_mpi_cluster)
    atexit.register(end_dask_mpi_cluster, address, security)


#: Seconds for each step of ending dask-mpi's cluster at exit.
END_TIMEOUT = 10.0


def end_dask_mpi_cluster(address: str, security: Any, timeout: float = END_TIMEOUT) -> None:
    """End dask-mpi's cluster as its own exit hook does, workers first: each
    closes itself, and the scheduler is shut down once it has none left.
    Nothing to do if the scheduler is gone already (the script shut it down)."""
    from .scheduler_file import answers

    if not answers(address, timeout=min(2.0, timeout)):
        return
    from distributed import Client

    try:
        with Client(address, security=security, timeout=timeout, set_as_default=False) as client:
            client.run_on_scheduler(_close_every_worker)
            deadline = time.monotonic() + timeout
            while client.scheduler_info()["workers"] and time.monotonic() < deadline:
                time.sleep(0.05)
            client.shutdown()
    except Exception:
        logger.debug("could not end dask-mpi's cluster at %s", address, exc_info=True)


def _close_every_worker(dask_scheduler: Any = None) -> int:
    workers = list(dask_scheduler.workers)
    for worker in workers:
        dask_scheduler.close_worker(worker)
    return len(workers)


def min_workers_for(wait_for_workers: float | int | None, expected: int | None) -> int:
    """Workers to wait for when joining: ``wait_for_workers`` (a count, or a
    fraction of those expected), else all those expected, else none."""
    if isinstance(wait_for_workers, int):
        return wait_for_workers
    if expected is None:
        return 0
    if isinstance(wait_for_workers, float):
        return max(1, math.ceil(wait_for_workers * expected))
    return expected


class PublishedLauncher:
    """A launcher whose executor's scheduler stays published in Dask's
    config until the launcher closes (see :func:`publish`); tells the
    launcher its executor's client is ready first."""

    def __init__(self, launcher: Any, client: Any) -> None:
        launcher.ready(client)
        self._launcher = launcher
        self._token = publish(client, own_cluster=launcher.name in STARTED_BY_EXECUTORS)

    def close(self, timeout: float) -> None:
        unpublish(self._token)
        self._launcher.close(timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._launcher, name)
