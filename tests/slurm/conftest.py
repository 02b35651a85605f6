"""Fixtures for tests that run real jobs on the local SLURM test cluster.

The cluster (3 nodes n1..n3, 4 CPUs and 6000 MB each, one machine; each
node, and slurmctld, in a network namespace of its own, on a private bridge)
is started once per session by ``tests/slurm/cluster.sh start``; the first
start may install slurm-wlm and munge with apt, hence the long deadline.
SLURM commands run in the cluster's login namespace
(:func:`tests.slurm.jobs.slurm_command`): this process, in the root
namespace, has no address on the cluster's network. These tests never skip:
in CI a skip would hide a broken launch mode.

The root conftest strips ``SLURM_*`` and friends from ``os.environ`` for each
test, so every SLURM command gets its environment from
:func:`tests.slurm.jobs.job_env`.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess

import pytest

from tests.slurm.jobs import CLUSTER_SH


@pytest.fixture(scope="session")
def slurm_conf():
    """Start (or find) the test cluster; return its SLURM_CONF. A cluster
    this session started is stopped at its end; one it found running is
    left alone."""
    result = subprocess.run(
        ["bash", str(CLUSTER_SH), "start"], capture_output=True, text=True, timeout=900,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{CLUSTER_SH} start failed with status {result.returncode}:\n{result.stderr}"
        )
    match = re.search(r"export SLURM_CONF=(\S+)", result.stdout)
    if match is None:
        raise RuntimeError(f"{CLUSTER_SH} start printed no SLURM_CONF: {result.stdout!r}")
    yield match.group(1)
    if "export SULIS_SLURM_STARTED=1" in result.stdout:
        subprocess.run(["bash", str(CLUSTER_SH), "stop"], capture_output=True, timeout=120)



@pytest.fixture(scope="session", autouse=True)
def no_mpich_leftovers():
    """Remove the shared-memory segments MPICH leaves in /dev/shm when a test
    kills an MPI job's ranks before they could clean up (scancel, a lost
    node). Only segments that appeared during this session are removed, once
    its jobs have ended."""
    pattern = "/dev/shm/mpich_shm_*"
    before = set(glob.glob(pattern))
    yield
    for path in set(glob.glob(pattern)) - before:
        try:
            os.unlink(path)
        except OSError:
            pass
