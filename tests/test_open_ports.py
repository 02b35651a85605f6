"""No open doors on the network: what the executor's processes listen on.

Each test runs ``tests/open_ports_probe.py`` in a network namespace of its
own (``unshare --net``), with loopback and a veth pair whose one end has a
private address (10.77.0.1) that the comms bind (``SULIS_EXECUTOR_INTERFACE``).
Elsewhere the tests bind everything to ``lo``, where "on loopback" holds for
every socket whatever the code does; here a socket bound where the comms are,
or on every interface, shows. The namespace (and its interfaces) ends with
the probe's process tree, whatever happens to the test.

Every listening socket of every process the executor started (the script's,
which runs the scheduler and the client, the fork server, every worker) must
be a TLS comm port the scheduler knows of, or on loopback; and no process's
environment may hold the job's secrets.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.open_ports_probe import open_doors

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "open_ports_probe.py"

#: The private address of the namespace's interface, where the comms bind.
NAMESPACE_ADDRESS = "10.77.0.1"
NAMESPACE_INTERFACE = "sulis0"
NAMESPACE_SETUP = f"""
set -e
ip link set lo up
ip link add {NAMESPACE_INTERFACE} type veth peer name sulis1
ip addr add {NAMESPACE_ADDRESS}/24 dev {NAMESPACE_INTERFACE}
ip link set {NAMESPACE_INTERFACE} up
ip link set sulis1 up
exec "$@"
"""

pytestmark = pytest.mark.timeout(180)


def run_probe_in_namespace(tmp_path: Path, options: dict[str, Any],
                           launcher: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the probe (under ``launcher``, e.g. mpiexec) in a fresh network
    namespace; return its report."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        pytest.skip("needs unshare (util-linux) and ip (iproute2) to make a network namespace")
    # Root makes the namespace directly; anyone else in a user namespace of their own.
    flags = ["--net"] if os.geteuid() == 0 else ["--net", "--map-root-user"]
    env = {**os.environ, "SULIS_EXECUTOR_INTERFACE": NAMESPACE_INTERFACE}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [unshare, *flags, "bash", "-c", NAMESPACE_SETUP, "namespace",
         *launcher, sys.executable, str(PROBE), str(tmp_path), json.dumps(options)],
        env=env, capture_output=True, text=True, timeout=150,
    )
    if result.returncode != 0 and "Operation not permitted" in result.stderr and not (tmp_path / "report.json").exists():
        pytest.skip(f"cannot make a network namespace here: {result.stderr.strip()}")
    assert result.returncode == 0, f"the probe failed:\n{result.stdout}\n{result.stderr}"
    assert result.stdout == "" and result.stderr == "", "a normal run prints nothing"
    report: dict[str, Any] = json.loads((tmp_path / "report.json").read_text())
    return report


def assert_no_open_doors(report: dict[str, Any], members: int) -> None:
    # The comms really are on the namespace's interface, over TLS: else
    # "on loopback" would hold for anything.
    assert report["comms"] and all(a.startswith(f"tls://{NAMESPACE_ADDRESS}:") for a in report["comms"]), report["comms"]
    # One node: its agent (the Dask worker), and its pool's members.
    assert len(report["agent_pids"]) == 1 and len(report["member_pids"]) == members
    looked_at = set(report["processes"])
    assert set(map(str, report["agent_pids"] + report["member_pids"])) <= looked_at
    assert open_doors(report) == []
    assert report["environ_holders"] == []


@pytest.mark.parametrize("mp_context", [None, "spawn"], ids=["fork-server", "spawn"])
def test_local_mode_listens_only_on_tls_comm_ports_and_loopback(tmp_path: Path, mp_context: str | None) -> None:
    report = run_probe_in_namespace(tmp_path, {"max_workers": 2, "mp_context": mp_context})
    if mp_context is None:  # the fork server was among the processes looked at
        assert any("_forkserver" in p["cmdline"] for p in report["processes"].values())
    assert_no_open_doors(report, members=2)


@pytest.mark.mpi
def test_mpi_mode_listens_only_on_tls_comm_ports_and_loopback(tmp_path: Path) -> None:
    pytest.importorskip("mpi4py")
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("needs mpiexec")
    # Rank 0: scheduler and client; ranks 1 and 2: members, and rank 1 the agent.
    report = run_probe_in_namespace(tmp_path, {}, launcher=(mpiexec, "-n", "3"))
    assert_no_open_doors(report, members=2)
