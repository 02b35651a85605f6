"""Real per-node networking: every node of the test cluster has a network
namespace of its own (``tests/slurm/cluster.sh``), so its loopback is its
own and the nodes meet only over the cluster's bridge.

* The cluster itself: a server on ``127.0.0.1`` in n1's namespace is not
  reachable from n2's, while n1's address on ``eth0`` is.
* ``SULIS_EXECUTOR_INTERFACE=lo`` in a job over several nodes: the executor
  fails at once, in srun and mpi modes, with an error naming the interface
  and the way out, rather than waiting for workers on the other nodes that
  can never reach a scheduler on n1's loopback; on one node ``lo`` works.
* A network partition: n2's link to the bridge is cut (``ip link set v-n2
  down`` in the switch's namespace) mid-map. The map must not hang: every
  result arrives, in order (the calls lost on n2 run elsewhere), the
  executor goes on with the other nodes, and the script ends. The job is
  submitted with ``--no-kill`` so that SLURM, which declares n2 failed after
  ``SlurmdTimeout`` (30 s here), does not end the job itself; the worker
  step has ``--no-kill`` too, or SLURM would then end every worker of the
  step, on every node, and the map fail as a broken pool
  (``BrokenSulisExecutor``, promptly: in 3 of 6 runs before the step had
  it, when SLURM came before Dask dropped n2's workers). Dask drops each of n2's workers when its connection times out
  (``distributed.comm.timeouts.tcp``, 30 s: about 30 and 60 s after the
  cut, as seen). The link is restored once the script has reported, and n2
  is back in service before the next test.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.slurm.jobs import (
    Job,
    assert_no_processes_left,
    cluster_network,
    finished_cleanly,
    in_netns,
    node_namespace,
    poll_job,
    result_line,
    set_link,
    shape,
    slurm_command,
    submit,
    wait_for_job,
    wait_for_mpi_job,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]


# -- the cluster: each node's loopback is its own -----------------------------

SERVER = """
import socket, sys
server = socket.socket()
server.bind((sys.argv[1], 0))
server.listen()
print(server.getsockname()[1], flush=True)
while True:
    server.accept()[0].close()
"""

CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    print("connected")
except OSError as error:
    print(type(error).__name__)
"""


def connect_from(namespace: str, host: str, port: int) -> str:
    result = subprocess.run(in_netns(namespace, [sys.executable, "-c", CONNECT, host, str(port)]),
                            capture_output=True, text=True, timeout=30, check=True)
    return result.stdout.strip()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bind", ["127.0.0.1", "0.0.0.0"])
def test_a_node_reaches_another_over_the_cluster_network_only(slurm_conf: str, bind: str) -> None:
    n1, n2 = node_namespace(slurm_conf, "n1"), node_namespace(slurm_conf, "n2")
    server = subprocess.Popen(in_netns(n1, [sys.executable, "-c", SERVER, bind]),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        # On n1 itself, loopback reaches it.
        assert connect_from(n1, "127.0.0.1", port) == "connected"
        # From n2, 127.0.0.1 is n2's own loopback: nothing listens there.
        assert connect_from(n2, "127.0.0.1", port) == "ConnectionRefusedError"
        # n1's address on the cluster network reaches it iff it listens there.
        over_network = connect_from(n2, "10.77.0.11", port)
        assert over_network == ("connected" if bind == "0.0.0.0" else "ConnectionRefusedError")
    finally:
        server.kill()
        server.wait()


def test_the_root_namespace_is_not_on_the_cluster_network(slurm_conf: str) -> None:
    import psutil

    assert cluster_network(slurm_conf)["SULIS_SLURM_SUBNET"] == "10.77.0.0/24"
    ours = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET]
    assert not any(address.startswith("10.77.0.") for address in ours), ours


# -- interface=lo over several nodes ------------------------------------------

LOOPBACK = '''
import json, sys, time
from sulis_executor import SulisDaskExecutor

started = time.monotonic()
try:
    ex = SulisDaskExecutor()
except Exception as error:
    print("RESULT " + json.dumps({"error": f"{type(error).__name__}: {error}",
                                  "seconds": round(time.monotonic() - started, 2)}), flush=True)
    raise
with ex:
    results = list(ex.map(abs, range(-20, 0)))
    print("RESULT " + json.dumps({"workers": ex.num_workers, "ok": results == list(range(20, 0, -1)),
                                  "seconds": round(time.monotonic() - started, 2)}), flush=True)
'''

LOOPBACK_JOBS = {
    # name -> (batch body, shape)
    "srun_3_nodes": ('"$PYTHON" loopback.py\n', shape(3, 2)),
    "mpi_3_nodes": ('srun --mpi=pmi2 "$PYTHON" loopback.py\n', shape(3, 1)),
    "srun_1_node": ('"$PYTHON" loopback.py\n', shape(1, 2)),
}


@pytest.fixture(scope="module")
def loopback_jobs(slurm_conf: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    jobs = {}
    for name, (body, options) in LOOPBACK_JOBS.items():
        workdir = tmp_path_factory.mktemp(f"loopback-{name}")
        (workdir / "loopback.py").write_text(textwrap.dedent(LOOPBACK))
        script = workdir / "job.sbatch"
        script.write_text("#!/bin/bash\n" + body)
        jobs[name] = submit(script, workdir, slurm_conf, *options,
                            env={"SULIS_EXECUTOR_INTERFACE": "lo"})
    return jobs


def assert_loopback_refused(job: Job, error: str) -> None:
    # The interface, why it cannot work, and what to do instead.
    assert error.startswith("ValueError: network interface 'lo'"), job.describe()
    assert "loopback address 127.0.0.1" in error, job.describe()
    assert "on n1 cannot be reached by the workers on the job's other nodes (n2, n3)" in error, \
        job.describe()
    assert "SULIS_EXECUTOR_INTERFACE" in error and "eth0 (10.77.0.11)" in error, job.describe()


def test_loopback_over_several_nodes_fails_at_once_in_srun_mode(
        loopback_jobs: dict[str, Job]) -> None:
    job = wait_for_job(loopback_jobs["srun_3_nodes"], timeout=150)
    assert_no_processes_left(job)
    assert job.state == "FAILED" and job.exit_code == "1:0", job.describe()
    r = result_line(job)
    assert_loopback_refused(job, str(r["error"]))
    # Before any worker step: no waiting for workers that cannot come.
    assert r["seconds"] < 10, job.describe()  # type: ignore[operator]
    assert "srun:" not in job.text() and "sulis_executor.worker" not in job.text(), job.describe()


@pytest.mark.mpi
def test_loopback_over_several_nodes_fails_at_once_in_mpi_mode(
        loopback_jobs: dict[str, Job]) -> None:
    job = wait_for_mpi_job(loopback_jobs["mpi_3_nodes"], timeout=150)
    assert_no_processes_left(job)
    assert job.state == "FAILED" and job.exit_code != "0:0", job.describe()
    r = result_line(job)  # rank 0's; the other ranks are workers
    assert_loopback_refused(job, str(r["error"]))
    assert r["seconds"] < 10, job.describe()  # type: ignore[operator]
    # The worker ranks are told why, and exit.
    assert job.text().count("rank 0 could not start the scheduler: ValueError(\"network "
                            "interface 'lo'") == 2, job.describe()


def test_loopback_on_a_single_node_works(loopback_jobs: dict[str, Job]) -> None:
    job = finished_cleanly(loopback_jobs["srun_1_node"])
    r = result_line(job)
    assert r["workers"] == 2 and r["ok"] is True, job.describe()


# -- a network partition mid-map ----------------------------------------------

PARTITION = '''
import json, os, subprocess, time
from sulis_executor import SulisDaskExecutor
from tests.slurm import recorded

SWITCH = os.environ["SULIS_TEST_SWITCH_NETNS"]

N, CUT_AFTER = 300, 30
with SulisDaskExecutor() as ex:
    workers_before = ex.num_workers
    nodes_before = sorted(set(ex.client.run(lambda: os.environ.get("SLURMD_NODENAME")).values()))
    results = []
    for k, r in enumerate(ex.map(recorded.square, range(N))):
        results.append(r)
        if k + 1 == CUT_AFTER:
            # The switch's port of n2 down: n2 is cut off, its workers live on.
            subprocess.run(["ip", "-n", SWITCH, "link", "set", "v-n2", "down"], check=True)
            cut = time.monotonic()
            print(f"CUT n2 after {CUT_AFTER} results", flush=True)
    map_seconds = time.monotonic() - cut
    deadline = time.monotonic() + 30
    while ex.num_workers > workers_before - 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    still_works = ex.submit(pow, 7, 2).result(timeout=60)
    after = sorted(set(ex.client.run(lambda: os.environ.get("SLURMD_NODENAME")).values()))
    workers_after = ex.num_workers
    print("MAPPED " + json.dumps({"seconds": round(map_seconds, 1)}), flush=True)
shutdown_seconds = time.monotonic() - cut - map_seconds
print("RESULT " + json.dumps(dict(
    workers_before=workers_before, nodes_before=nodes_before, workers_after=workers_after,
    nodes_after=after, still_works=still_works, ok=results == [i * i for i in range(N)],
    n_results=len(results), **recorded.summary(N), map_seconds=round(map_seconds, 1),
    shutdown_seconds=round(shutdown_seconds, 1))), flush=True)
'''


def node_state(slurm_conf: str, node: str) -> str:
    result = subprocess.run(slurm_command(slurm_conf, "sinfo", "-h", "-n", node, "-o", "%t"),
                            capture_output=True, text=True, timeout=30)
    return result.stdout.strip()


def test_a_partitioned_node_loses_no_result_and_hangs_nothing(
        slurm_conf: str, tmp_path: Path) -> None:
    (tmp_path / "partition.py").write_text(textwrap.dedent(PARTITION))
    script = tmp_path / "job.sbatch"
    script.write_text('#!/bin/bash\n"$PYTHON" partition.py\n')
    switch = cluster_network(slurm_conf)["SULIS_SLURM_SWITCH_NETNS"]
    job = submit(script, tmp_path, slurm_conf, *shape(3, 2), "--no-kill",
                 env={"SULIS_TEST_SWITCH_NETNS": switch})
    try:
        # The script reports once the map, the executor's shutdown and all
        # are done: with n2 still cut off.
        poll_job(job, lambda: "RESULT " in job.text() or None, "no RESULT line", timeout=240)
    finally:
        set_link(slurm_conf, "n2", "up")
    wait_for_job(job, timeout=120)
    r = result_line(job)
    try:
        assert r["workers_before"] == 6 and r["nodes_before"] == ["n1", "n2", "n3"], job.describe()
        # Nothing lost, nothing twice, in order, though n2 was cut off mid-map.
        assert r["ok"] is True and r["n_results"] == 300, job.describe()
        assert r["executed"] is True, job.describe()
        # The executor goes on without n2.
        assert r["still_works"] == 49, job.describe()
        assert r["nodes_after"] == ["n1", "n3"] and r["workers_after"] == 4, job.describe()
        # Within a deadline: no hang on the lost node's calls, nor at shutdown.
        assert r["map_seconds"] < 120, job.describe()  # type: ignore[operator]
        assert r["shutdown_seconds"] < 60, job.describe()  # type: ignore[operator]
        assert job.state == "COMPLETED" and job.exit_code == "0:0", job.describe()
        assert "Traceback" not in job.text(), job.describe()
        assert_no_processes_left(job, timeout=60)
    finally:
        # n2 back in service for the next tests (slurmctld may have marked
        # it down while it was cut off; ReturnToService=2 brings it back).
        deadline = time.monotonic() + 120
        while (state := node_state(slurm_conf, "n2")) != "idle":
            assert time.monotonic() < deadline, f"n2 is {state!r}, not idle, after its link came back"
            time.sleep(0.5)
