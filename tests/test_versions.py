"""A worker running another version of sulis_executor than the client fails
the executor's start at once, with an error naming the worker and both
versions, instead of looping on deserialisation errors.

The "other version" is a copy of this checkout's package with a patched
``__version__``, found first on the workers' ``PYTHONPATH``, as on a node with
a stale environment; the client imports this checkout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sulis_executor import VersionMismatchError, __version__
from sulis_executor._versions import mismatch

REPO = Path(__file__).resolve().parents[1]
STALE = "0.0.0+stale"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def stale_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a copy of ``sulis_executor`` whose version is ``STALE``."""
    root = tmp_path_factory.mktemp("stale")
    shutil.copytree(REPO / "sulis_executor", root / "sulis_executor",
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = root / "sulis_executor" / "__init__.py"
    text = init.read_text()
    patched = re.sub(r'^__version__ = ".*"$', f'__version__ = "{STALE}"', text, flags=re.M)
    assert patched != text
    init.write_text(patched)
    return root


def stale_env(stale_copy: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(stale_copy), os.environ.get("PYTHONPATH")]))}


def assert_names_worker_and_both_versions(message: str, worker: str) -> None:
    assert worker in message, message
    assert f"runs sulis_executor {STALE}" in message, message
    assert f"this client runs sulis_executor {__version__}" in message, message


@pytest.mark.parametrize("mp_context", [None, "spawn"], ids=["fork-server", "spawn"])
def test_local_workers_of_another_version_are_refused_and_the_constructor_names_both(
        stale_copy: Path, tmp_path: Path, mp_context: str | None) -> None:
    # A generous timeout: waiting it out instead of failing at once would
    # show as this test's own timeout.
    options = {"max_workers": 2, "mp_context": mp_context, "timeout": 600}
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "stale_workers_script.py"), json.dumps(options)],
        # Not the checkout: ``python -m`` would find its package first.
        cwd=tmp_path, env=stale_env(stale_copy), capture_output=True, text=True, timeout=100,
    )
    outcome = json.loads(result.stdout)
    assert outcome["error"] == "VersionMismatchError", (outcome, result.stderr)
    assert_names_worker_and_both_versions(outcome["message"], "worker local-")
    # The refused worker says why, too (in srun mode, in the job's output).
    assert f"runs sulis_executor {STALE}" in result.stderr


def test_a_worker_of_another_version_on_a_cluster_you_run_is_named(stale_copy: Path, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    from sulis_executor import SulisDaskExecutor
    from sulis_executor._security import CredentialsFile, credentials_of, generate_credentials, security_from

    security = security_from(generate_credentials())
    credentials = CredentialsFile(credentials_of(security))
    with LocalCluster(n_workers=0, host="127.0.0.1", scheduler_port=0, dashboard_address="127.0.0.1:0",
                      security=security, protocol="tls://") as cluster, \
            Client(cluster, security=security) as client:
        worker = subprocess.Popen(
            [sys.executable, "-m", "sulis_executor.worker", cluster.scheduler_address,
             "--host", "127.0.0.1", "--name", "by-hand", "--security-file", credentials.path],
            cwd=tmp_path, env=stale_env(stale_copy),
        )
        try:
            client.wait_for_workers(1, timeout=60)
            with pytest.raises(VersionMismatchError) as raised:
                SulisDaskExecutor(address=cluster.scheduler_address, security=security, timeout=60)
        finally:
            worker.kill()
            worker.wait()
            credentials.remove()
    assert_names_worker_and_both_versions(str(raised.value), "worker by-hand (tls://127.0.0.1:")


def test_mismatch_names_what_the_worker_runs() -> None:
    assert mismatch(__version__, "w") is None
    assert "runs sulis_executor 9.9" in (mismatch("9.9", "w") or "")
    assert "from before workers reported their version" in (mismatch(None, "w") or "")
    assert "cannot import sulis_executor" in (mismatch(None, "w", reported=False) or "")
