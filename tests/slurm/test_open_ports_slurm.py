"""No open doors in ``srun`` mode: secrets out of every environment, and
nothing listening but TLS comm ports and loopback.

A 2 x 2 batch job runs ``tests/open_ports_probe.py`` (see there), which starts
an executor the way a batch script does (``launch='srun'``), makes it work,
and reports the listening sockets of its processes (the script's, ``srun``,
every worker) and every process on this machine whose environment holds the
job's secrets (all the test cluster's "nodes" are this machine, so that is
``srun``, ``slurmstepd`` and every worker too).

Every node of the test cluster has a network namespace of its own, and the
comms bind its ``eth0`` (``SULIS_EXECUTOR_INTERFACE``, see
``tests/slurm/jobs.py``): an address on the cluster network, 10.77.0.x, not
loopback, so "on loopback" and "where the comms are" differ, as on a real
cluster. The probe reads each process's sockets from ``/proc/PID/net/*``,
which shows that process's own network namespace (its node's).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.open_ports_probe import host_port, open_doors
from tests.slurm.jobs import REPO, finished_cleanly, submit

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

#: The shape of the job in issue 17: 2 nodes x 2 tasks.
SHAPE = ("--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem-per-cpu=500")

BATCH_SCRIPT = f"""#!/bin/bash
exec "$PYTHON" {REPO}/tests/open_ports_probe.py "$PWD"
"""


def srun_is_slurms(cmdline: str) -> bool:
    """``srun`` listens for its tasks' I/O and messages: SLURM's ports, not ours."""
    return cmdline.split(" ", 1)[0].rsplit("/", 1)[-1] == "srun"


@pytest.fixture(scope="module")
def report(slurm_conf: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    import json

    workdir: Path = tmp_path_factory.mktemp("open-ports")
    script = workdir / "probe.sbatch"
    script.write_text(BATCH_SCRIPT)
    finished_cleanly(submit(script, workdir, slurm_conf, *SHAPE))
    parsed: dict[str, object] = json.loads((workdir / "report.json").read_text())
    return parsed


def test_srun_mode_leaves_no_secret_in_any_environment(report: dict[str, object]) -> None:
    # 2 nodes: an agent each, and 4 members in all.
    assert len(report["agent_pids"]) == 2 and len(report["member_pids"]) == 4  # type: ignore[arg-type]
    assert report["environ_holders"] == []


def test_srun_mode_listens_only_on_tls_comm_ports_and_loopback(report: dict[str, object]) -> None:
    assert all(address.startswith("tls://") for address in report["comms"])  # type: ignore[attr-defined]
    # The comms are on the nodes' own addresses (n1's, n2's), not loopback:
    # the check below is a real one.
    hosts = {host_port(address)[0] for address in report["comms"]}  # type: ignore[attr-defined]
    assert hosts == {"10.77.0.11", "10.77.0.12"}, report["comms"]
    assert any(srun_is_slurms(p["cmdline"]) for p in report["processes"].values())  # type: ignore[attr-defined]
    assert open_doors(report, not_ours=srun_is_slurms) == []
