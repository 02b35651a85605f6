"""The test cluster's own script, ``tests/slurm/cluster.sh``.

A test session can end while one of its jobs still runs (a module whose
tests were deselected still submits its jobs, or a run is interrupted), and
``stop`` then ends the daemons with that job on the books. The next
``start`` must not bring the job back: its nodes would stay "mixed", not
idle, and every SLURM test of the next session would fail to start.

This runs a one-node cluster of its own, in a directory and on ports of its
own, beside the session's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.slurm.jobs import CLUSTER_SH
from tests.waiting import wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


def cluster(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CLUSTER_SH), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def job_state(env: dict[str, str], job_id: str) -> str:
    return cluster(env, "run", "squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip()


def test_a_cluster_stopped_while_a_job_ran_starts_again_idle_and_without_it() -> None:
    # Not under pytest's tmp_path: munged refuses its private (0700) parents.
    directory = Path(f"/tmp/sulis-slurm-restart-{uuid.uuid4().hex[:8]}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SULIS_SLURM"))}
    env.update(SULIS_SLURM_DIR=str(directory), SULIS_SLURM_NODES="1",
               SULIS_SLURMCTLD_PORT="19917", SULIS_SLURMD_PORT="19101",
               SULIS_SLURM_START_TIMEOUT="30")
    try:
        started = cluster(env, "start")
        assert started.returncode == 0, started.stderr
        submitted = cluster(env, "run", "sbatch", "--parsable", "--nodes=1", "--wrap", "sleep 300")
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip().split(";")[0]
        wait_until(lambda: job_state(env, job_id) == "RUNNING", 60, f"job {job_id} to start")
        assert cluster(env, "stop").returncode == 0

        again = cluster(env, "start")
        # Before the fix: "nodes not idle after 30s", the job back on n1.
        assert again.returncode == 0, again.stderr
        assert cluster(env, "run", "squeue", "-h", "-o", "%i").stdout.strip() == ""
    finally:
        cluster(env, "stop", timeout=120)
        shutil.rmtree(directory, ignore_errors=True)
