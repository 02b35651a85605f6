"""The benchmark suite's quick mode runs end to end (a smoke test only).

It checks that every executor and case still runs and gives correct results
(each benchmark verifies its results before timing counts). It asserts
nothing about speed: these machines are too noisy for timing bars.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(400)
def test_quick_benchmark_runs_every_executor_and_writes_its_report(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SULIS_EXECUTOR_"))}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=360,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "latest.md").read_text()
    for executor in ("SulisDaskExecutor", "ProcessPoolExecutor", "mpi4py"):
        assert executor in table
    assert (tmp_path / "throughput.png").stat().st_size > 0


@pytest.mark.timeout(60)
def test_an_mpi4py_run_killed_at_its_timeout_leaves_no_shared_memory_behind():
    from benchmarks.run import _mpich_segments, run_child

    before = _mpich_segments()
    # 200 sleeps of 50 ms on 2 ranks take 5 s: killed mid-run, with MPICH's
    # shared memory in use.
    record = run_child("mpi4py", "sleep", 200, 2, timeout=3)
    assert record["status"] == "timeout", record
    assert _mpich_segments() - before == set()
