"""Shared fixtures.

Every test runs with a clean environment (no SLURM_*, SULIS_EXECUTOR_* or
DASK_* variables leaking in from the shell that started pytest), and Dask
comms bound to loopback. Tests that only need *a* cluster attach to one
session-wide local cluster (``launch='address'``), which keeps the suite fast;
tests of starting and stopping clusters make their own.
"""

from __future__ import annotations

import os
import threading

import psutil
import pytest

from tests.waiting import alive

_STRIPPED_PREFIXES = ("SLURM_", "SULIS_EXECUTOR_", "DASK_", "PMI_", "OMPI_", "MPICH_", "HYDRA_")


def _clean(environ: dict[str, str]) -> None:
    for name in list(environ):
        if name.startswith(_STRIPPED_PREFIXES):
            del environ[name]


# Strip at import too, so the session cluster below starts clean.
_clean(os.environ)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(_STRIPPED_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SULIS_EXECUTOR_INTERFACE", "lo")


@pytest.fixture(scope="session")
def host_executor():
    """A session-wide local cluster of 2 worker processes (one node: a Dask
    worker, its agent, whose pool has 2 members), owned by one executor."""
    from sulis_executor import SulisDaskExecutor

    ex = SulisDaskExecutor(max_workers=2, interface="lo")
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="session")
def plain_cluster():
    """A session-wide cluster of 2 plain Dask workers (one thread each, in
    processes of their own, over TLS), as ``dask-mpi`` or ``dask worker``
    start them: what the executor attaches to with ``address=`` or
    ``scheduler_file=``, where each batch is a Dask task."""
    import logging

    from distributed import LocalCluster
    from distributed.security import Security

    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", scheduler_port=0,
        dashboard_address="127.0.0.1:0", protocol="tls://", security=Security.temporary(),
        silence_logs=logging.CRITICAL,
    )
    yield cluster
    cluster.close(timeout=30)


@pytest.fixture(scope="session")
def scheduler_address(plain_cluster) -> str:
    address: str = plain_cluster.scheduler_address
    return address


@pytest.fixture(scope="session")
def cluster_security(plain_cluster):
    """The session cluster's TLS credentials (``distributed.Security``)."""
    return plain_cluster.security


@pytest.fixture
def shared_executor(scheduler_address, cluster_security):
    """An executor attached to the session's plain Dask cluster; shut down
    after the test."""
    from sulis_executor import SulisDaskExecutor

    ex = SulisDaskExecutor(address=scheduler_address, security=cluster_security, wait_for_workers=2)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def no_process_left():
    """Fail if the test leaves a child process of its own behind (the
    session's shared cluster, if any, was there before)."""
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    yield
    left = alive({child.pid for child in psutil.Process().children(recursive=True)} - before)
    assert not left, f"processes left behind: {[psutil.Process(p).cmdline() for p in left]}"


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Executors made in a test must not leave their threads running."""
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [
        t for t in threading.enumerate()
        if t.ident not in before and t.name.startswith("sulis-executor") and t.is_alive()
    ]
    for t in leaked:
        t.join(15)
    assert not [t for t in leaked if t.is_alive()], f"leaked threads: {leaked}"
