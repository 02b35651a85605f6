"""The Dask versions we claim (setup.cfg) are the ones that work.

``.ci/run`` runs this module, the contract tests and the SLURM launch-mode
tests twice: on the newest Dask, and on the oldest we support
(``_dask_private.MINIMUM``). Dask's private APIs are used in one module only,
which refuses an older Dask by name. What differs between versions shows in
what the executor does with the cluster, so that is what is checked: every
worker counted, and as many calls running at once as there are worker
threads (on 2025.1.0, with no ``total_threads`` in ``scheduler_info()``,
one batch at a time went out; from 2025.4 to 2026.6, ``scheduler_info()``
listed 5 workers at most).
"""

from __future__ import annotations

import configparser
import logging
import re
from pathlib import Path

import pytest

import sulis_executor
from sulis_executor import SulisDaskExecutor, _dask_private
from tests import executor_tasks as tasks

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parent.parent
PACKAGE = Path(sulis_executor.__file__).resolve().parent

#: What marks a use of Dask's private APIs in our code.
PRIVATE = [
    "_graph_to_futures", "dask._expr", "dask._task_spec", "stream_handlers", "stream_comms",
    "client_comms", "batched_stream", "scheduler_comm", "worker_state_machine", ".state.executing",
    "long_running", "_worker_cvar", "_current_client", "_global_clients", '.handlers["',
    "processing_on",
]


def test_dasks_private_apis_are_used_in_one_module_only():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_dask_private.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            found += [f"{path.relative_to(PACKAGE)}:{number}: {name}" for name in PRIVATE if name in code]
            # Any underscore-prefixed module or name imported from dask or distributed.
            imported = re.search(r"\b(?:from|import) ((?:dask|distributed)[\w.]*)(?: import (.*))?", code)
            if imported:
                names = [imported.group(1).split(".")[-1]]
                names += [part.split(" as ")[0].strip(" ()") for part in (imported.group(2) or "").split(",")]
                if any(name.startswith("_") for name in names):
                    found.append(f"{path.relative_to(PACKAGE)}:{number}: {code.strip()}")
    assert not found, "Dask private APIs outside _dask_private:\n" + "\n".join(found)


def test_setup_cfg_requires_the_floor_we_check_and_test():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    requires = config["options"]["install_requires"].split()
    for name in ("dask", "distributed"):
        assert f"{name}>={_dask_private.MINIMUM}" in requires
    ci = (REPO / ".ci" / "run").read_text()
    assert f"DASK_FLOOR={_dask_private.MINIMUM}\n" in ci, ".ci/run must test the oldest supported Dask"
    readme = (REPO / "README.rst").read_text()
    assert _dask_private.MINIMUM in readme


def test_the_installed_dask_is_within_what_we_support():
    versions = _dask_private.installed_versions()
    _dask_private.check_versions(versions)  # raises if not
    assert versions["dask"] and versions["distributed"]


@pytest.mark.parametrize("dask_version, distributed_version", [
    ("2024.12.1", "2024.12.1"), ("2025.1.0", "2024.8.0"), ("2024.8.0", "2025.1.0"),
])
def test_an_older_dask_is_refused_naming_the_versions(dask_version, distributed_version):
    with pytest.raises(ImportError) as info:
        _dask_private.check_versions({"dask": dask_version, "distributed": distributed_version})
    message = str(info.value)
    assert f"dask {dask_version}" in message and f"distributed {distributed_version}" in message
    assert f"{_dask_private.MINIMUM} or newer" in message


@pytest.mark.parametrize("version", ["2025.1.0", "2025.12.0", "2026.8.0+3.gdeadbee", "2027.1.0rc1"])
def test_the_floor_and_newer_versions_are_accepted(version):
    _dask_private.check_versions({"dask": version, "distributed": version})


@pytest.fixture(scope="module")
def eight_workers():
    """A cluster of 8 one-thread workers, more than scheduler_info() lists by
    default on some versions (in this process: 8 processes are too many here)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=8, threads_per_worker=1, processes=False, protocol="tcp://",
                      host="127.0.0.1", dashboard_address=None, silence_logs=logging.CRITICAL) as cluster:
        yield cluster


def test_num_workers_counts_every_worker_of_a_cluster_of_eight(eight_workers):
    with SulisDaskExecutor(address=eight_workers.scheduler_address, wait_for_workers=8) as ex:
        assert ex.num_workers == 8


def _all_meet(ex: SulisDaskExecutor, parties: int, directory: Path) -> None:
    """Submit ``parties`` calls that each wait for all of them to be
    running: they all meet only if the executor keeps at least that many on
    the cluster at once."""
    futures = [ex.submit(tasks.meet, str(directory), str(i), parties) for i in range(parties)]
    met = [future.result(timeout=60) for future in futures]
    assert met == [parties] * parties, (
        f"{parties} worker threads, but only {min(met)} calls were running at once "
        f"(arrivals each call saw: {met})"
    )


def test_as_many_calls_run_at_once_as_a_cluster_of_eight_has_threads(eight_workers, tmp_path):
    with SulisDaskExecutor(address=eight_workers.scheduler_address, wait_for_workers=8) as ex:
        _all_meet(ex, 8, tmp_path)


def test_as_many_calls_run_at_once_as_worker_processes(shared_executor, tmp_path):
    """Across processes: the session cluster's 2 one-thread worker processes."""
    _all_meet(shared_executor, 2, tmp_path)
