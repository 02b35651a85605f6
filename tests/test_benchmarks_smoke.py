"""The benchmark suite's quick mode runs end to end (a smoke test only).

It checks that every executor and case still runs and gives correct results
(each benchmark verifies its results before timing counts): the quick run's
results file must show every executor of every case done with verified
results, not timed out, failed or skipped. It asserts nothing about speed:
these machines are too noisy for timing bars.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: The one skip a complete quick run has: a larger N that the run itself
#: estimates would overrun its limit, from the same executor's rate at a
#: smaller N of the case (which must then have run, verified).
ESTIMATED_TOO_LONG = re.compile(r"skipped: est\. [\d,.]+ s > ")


def not_verified(results: dict, plan: dict, repeats: int) -> list[str]:
    """What in a run's ``latest.json`` falls short of every executor of
    every case of ``plan`` run ``repeats`` times with verified results."""
    runs: dict[tuple, list[dict]] = {}
    for record in results["records"]:
        runs.setdefault((record["case"], record["n"], record["executor"]), []).append(record)
    problems = []
    for case, (sizes, executors, _) in plan.items():
        for executor in executors:
            verified_sizes = []
            for n in sizes:
                records = runs.get((case, n, executor), [])
                if [r["status"] for r in records] == ["ok"] * repeats:
                    verified_sizes.append(n)
                elif not (len(records) == 1 and records[0]["status"] == "skipped"
                          and ESTIMATED_TOO_LONG.match(records[0]["reason"])):
                    problems.append(f"{case} N={n} {executor}: "
                                    + ("; ".join(f"{r['status']} ({r.get('reason')})" for r in records)
                                       or "never run"))
            if not verified_sizes:
                problems.append(f"{case} {executor}: no size ran with verified results")
    return problems


def benchmark_env() -> dict[str, str]:
    """Ours, without the job's SLURM or executor settings, with the repository importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SULIS_EXECUTOR_"))}
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.mark.timeout(400)
def test_quick_benchmark_runs_every_executor_and_writes_its_report(tmp_path):
    env = benchmark_env()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=360,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from benchmarks.run import QUICK

    results = json.loads((tmp_path / "latest.json").read_text())
    problems = not_verified(results, QUICK, repeats=1)
    assert not problems, "not every executor and case ran with verified results:\n" + "\n".join(problems)
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
    left = _mpich_segments() - before
    assert left == set(), f"left behind: {sorted(map(str, left))}; mapped by: {mapped_by(left)}"


def mapped_by(paths) -> dict[str, list[str]]:
    """Which processes map or hold open each of ``paths`` (to tell a
    segment of ours left behind from another MPI program's new one)."""
    import psutil

    holders: dict[str, list[str]] = {str(path): [] for path in paths}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            held = {m.path for m in proc.memory_maps(grouped=True)} | {f.path for f in proc.open_files()}
        except psutil.Error:
            continue
        for path in holders.keys() & held:
            holders[path].append(f"{proc.info['pid']} {' '.join(proc.info['cmdline'] or [])[:120]}")
    return holders


@pytest.mark.timeout(120)
def test_the_central_cost_benchmark_writes_its_table(tmp_path):
    env = benchmark_env()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.central_cost", "--members", "2", "--batches", "20",
         "--repeats", "1", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in (tmp_path / "central_cost.md").read_text().splitlines()
            if line.startswith("| 2 |")]
    assert len(rows) == 1 and "| 20 |" in rows[0], rows
