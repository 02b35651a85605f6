"""Startup in ``srun`` mode on the 3-node test cluster, and what it is made of.

    python -m benchmarks.srun_startup [--repeats R] [--out DIR]

starts (or finds) the test cluster (``tests/slurm/cluster.sh``), submits one
3-node x 2-task job, and inside it measures, ``R`` times each:

* ``srun true``: launching a job step on every task, nothing else;
* how long ``import distributed`` takes in a step of one task per node (the
  slowest node), which is what the executor's step does: each node imports
  Dask once and forks its workers;
* ``SulisDaskExecutor()`` as the batch script would run it: constructor
  returns, then all 6 workers registered, then the first result.

A cluster it started is stopped at the end. It writes
``srun_startup.md`` (medians, min-max) to ``--out`` (default
``benchmarks/results``). All of it runs on one machine pretending to be
three nodes, so only the proportions mean much.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import checkout_commit

MARKER = "SRUN_STARTUP "
REPO = Path(__file__).resolve().parents[1]
TASKS = 6


#: Run by every task of a step: how long importing Dask took there.
IMPORT_TIMER = (
    "import time; t = time.perf_counter(); import distributed; print(time.perf_counter() - t)"
)


def _timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=300)
    return time.perf_counter() - started


def in_job(repeats: int) -> None:
    """Run inside the batch script: measure, print one ``SRUN_STARTUP`` line."""
    from benchmarks.tasks import inc
    from sulis_executor import SulisDaskExecutor

    rows = []
    for _ in range(repeats):
        row = {"srun_true_s": _timed(["srun", "true"])}
        imports = subprocess.run(["srun", "--ntasks-per-node=1", sys.executable, "-c", IMPORT_TIMER],
                                 check=True,
                                 capture_output=True, text=True, timeout=300).stdout.split()
        row["import_s"] = max(float(seconds) for seconds in imports)
        started = time.perf_counter()
        ex = SulisDaskExecutor()
        row["constructor_s"] = time.perf_counter() - started
        deadline = time.monotonic() + 120
        while ex.num_workers < TASKS and time.monotonic() < deadline:  # (the constructor waits for all)
            time.sleep(0.01)
        row["all_workers_s"] = time.perf_counter() - started
        assert ex.submit(inc, 1).result(timeout=60) == 2
        row["first_result_s"] = time.perf_counter() - started
        stopping = time.perf_counter()
        ex.shutdown()
        row["shutdown_s"] = time.perf_counter() - stopping
        row["workers"] = TASKS
        rows.append(row)
    print(MARKER + json.dumps(rows), flush=True)


BATCH_SCRIPT = """#!/bin/bash
exec "$PYTHON" -m benchmarks.srun_startup --in-job --repeats {repeats}
"""

COLUMNS = [
    ("srun_true_s", "`srun true` (step launch)"),
    ("import_s", "`import distributed` in a step of one task per node (slowest node)"),
    ("constructor_s", "constructor returns"),
    ("all_workers_s", "all 6 workers registered"),
    ("first_result_s", "first result"),
    ("shutdown_s", "shutdown"),
]


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} ({min(values):.3g}–{max(values):.3g})"


def report(rows: list[dict[str, float]], commit: str) -> str:
    lines = [
        "# Startup in srun mode (3 nodes x 2 tasks, one machine)",
        "",
        f"- commit `{commit}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{len(rows)} repeats in one job; seconds, median (min–max)",
        "- every executor row counts from the constructor call; the srun rows are separate steps",
        "",
        "| measurement | seconds |",
        "|---|---|",
    ]
    lines += [f"| {label} | {_cell([r[key] for r in rows])} |" for key, label in COLUMNS]
    lines += ["", "Read the rows as proportions. They need not add up: on 2 cores the executor "
              "has been ready sooner than the baseline step's import of `distributed`, though "
              "its node processes import it too; this benchmark does not explain why."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.srun_startup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--in-job", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_job:
        in_job(args.repeats)
        return 0

    sys.path.insert(0, str(REPO))
    from tests.slurm.jobs import CLUSTER_SH, JOB_SHAPE, submit, wait_for_job

    started = subprocess.run(["bash", str(CLUSTER_SH), "start"], capture_output=True, text=True,
                             timeout=900, check=True)
    slurm_conf = started.stdout.split("export SLURM_CONF=")[1].split()[0]
    try:
        with tempfile.TemporaryDirectory(prefix="srun-startup-") as tmp:
            script = Path(tmp) / "srun_startup.sbatch"
            script.write_text(BATCH_SCRIPT.format(repeats=args.repeats))
            job = wait_for_job(submit(script, Path(tmp), slurm_conf, *JOB_SHAPE), timeout=600)
            text = job.text()
    finally:  # a cluster found running is someone else's
        if "export SULIS_SLURM_STARTED=1" in started.stdout:
            subprocess.run(["bash", str(CLUSTER_SH), "stop"], capture_output=True, timeout=300)
    line = next((ln for ln in text.splitlines() if ln.startswith(MARKER)), None)
    if line is None:
        print(f"the job printed no measurements:\n{job.describe()}", file=sys.stderr)
        return 1
    rows = json.loads(line[len(MARKER):])
    table = report(rows, checkout_commit())
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, "srun_startup.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
