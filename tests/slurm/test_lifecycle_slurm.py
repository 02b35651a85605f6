"""How the srun and mpi modes start, fail and end, as real SLURM jobs.

* srun: after ``shutdown()`` the worker step is gone from ``squeue`` before
  the script goes on; a step whose workers cannot start fails the
  constructor at once with srun's stderr in the error, not after the timeout.
* mpi: if rank 0 dies, the worker ranks do not hang: they give up after
  their death timeout and exit, and the job ends.
* srun with ``max_tasks_per_child``: each worker process runs at most that
  many tasks, and the node's process starts a fresh one in its place, as
  ``ProcessPoolExecutor`` does.

Scripts are written to ``tmp_path``; the jobs run at the same time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.slurm.jobs import (
    JOB_SHAPE,
    REPO,
    Job,
    assert_no_processes_left,
    finished_cleanly,
    result_line,
    submit,
    wait_for_mpi_job,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

SRUN_LIFECYCLE = '''
import os, subprocess, sys, time
from _common import report
from sulis_executor import SulisDaskExecutor

def worker_steps():
    out = subprocess.run(["squeue", "-h", "-s", "-j", os.environ["SLURM_JOB_ID"], "-o", "%j"],
                         capture_output=True, text=True, check=True).stdout
    return [name for name in out.split() if name.startswith("sulis-workers-")]

with SulisDaskExecutor() as ex:
    workers = ex.num_workers
    steps_while_open = worker_steps()
    squares = list(ex.map(pow, range(20), [2] * 20))
started = time.monotonic()
while (steps_after := worker_steps()) and time.monotonic() - started < 20:
    time.sleep(0.2)

# Workers that cannot start: the srun step ends early, and says why.
started = time.monotonic()
try:
    SulisDaskExecutor(local_directory="/proc/not-writable", timeout=60)
    early = "no error"
except RuntimeError as error:
    early = str(error)
early_seconds = time.monotonic() - started

report(workers=workers, steps_while_open=len(steps_while_open), steps_after=steps_after,
       ok=squares == [i * i for i in range(20)], early=early, early_seconds=early_seconds)
'''

MPI_RANK0_DIES = '''
import os
from sulis_executor import SulisDaskExecutor
ex = SulisDaskExecutor()
print("rank 0 up with", ex.num_workers, "workers", flush=True)
os._exit(3)  # rank 0 dies without shutting anything down
'''


SRUN_MAX_TASKS = '''
import os
from _common import report
from sulis_executor import SulisDaskExecutor

with SulisDaskExecutor(max_tasks_per_child=2) as ex:
    workers = ex.num_workers
    # Submitted at once: each call is still a task of its own.
    pids = [f.result(timeout=120) for f in [ex.submit(os.getpid) for _ in range(30)]]
    squares = list(ex.map(pow, range(40), [2] * 40, chunksize=4))
    after = [ex.submit(os.getpid).result(timeout=120) for _ in range(6)]
report(workers=workers, pids=pids, after=after, ok=squares == [i * i for i in range(40)])
'''


def batch_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    return path


@pytest.fixture(scope="module")
def submitted(slurm_conf: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    def plain_python_job(name: str, source: str) -> Job:
        """``source`` run as a batch script's plain ``python`` (srun mode)."""
        directory = tmp_path_factory.mktemp(name)
        (directory / "job.py").write_text(source)
        script = batch_script(directory / "job.sbatch", """
            export PYTHONPATH="$EXAMPLES_DIR:$PYTHONPATH"   # for _common
            "$PYTHON" job.py
        """)
        return submit(script, directory, slurm_conf, *JOB_SHAPE)

    jobs = {"srun": plain_python_job("srun-lifecycle", SRUN_LIFECYCLE),
            "max_tasks": plain_python_job("srun-max-tasks", SRUN_MAX_TASKS)}

    mpi_dir = tmp_path_factory.mktemp("mpi-rank0-dies")
    (mpi_dir / "dies.py").write_text(MPI_RANK0_DIES)
    # --kill-on-bad-exit=0: SLURM leaves the other ranks running, so they
    # must end by themselves.
    script = batch_script(mpi_dir / "job.sbatch", """
        srun --mpi=pmi2 --kill-on-bad-exit=0 "$PYTHON" dies.py
    """)
    jobs["mpi"] = submit(script, mpi_dir, slurm_conf, *JOB_SHAPE,
                         env={"SULIS_EXECUTOR_TIMEOUT": "10"})
    return jobs


def test_srun_step_ends_with_the_executor_and_early_exit_is_reported(
        submitted: dict[str, Job]) -> None:
    job = finished_cleanly(submitted["srun"])
    result = result_line(job)
    assert result["ok"] is True and result["workers"] == 6, job.describe()
    assert result["steps_while_open"] == 1, job.describe()
    assert result["steps_after"] == [], job.describe()
    early = str(result["early"])
    assert "srun step that starts the workers" in early and "exited with status" in early, early
    assert "srun: error" in early or "sulis_executor.worker" in early, early
    assert result["early_seconds"] < 30, job.describe()  # type: ignore[operator]


def test_srun_worker_processes_are_replaced_after_max_tasks_per_child(
        submitted: dict[str, Job]) -> None:
    job = finished_cleanly(submitted["max_tasks"])
    result = result_line(job)
    assert result["ok"] is True and result["workers"] == 6, job.describe()
    pids = list(result["pids"]) + list(result["after"])  # type: ignore[call-overload]
    runs = {pid: pids.count(pid) for pid in set(pids)}
    assert max(runs.values()) <= 2, f"a worker process ran more than 2 tasks: {runs}"
    # 36 calls at 2 each: at least 18 processes, and still 6 at work at the end.
    assert len(runs) >= 18, runs
    assert len(result["after"]) == 6, job.describe()  # type: ignore[arg-type]


@pytest.mark.mpi
def test_mpi_worker_ranks_exit_when_rank0_dies(submitted: dict[str, Job]) -> None:
    # Death timeout (10 s) + final barrier (15 s) + start-up: well under 90 s.
    job = wait_for_mpi_job(submitted["mpi"], timeout=90)
    assert_no_processes_left(job)
    text = job.text()
    assert "rank 0 up with 5 workers" in text, job.describe()
    assert job.state == "FAILED" and job.exit_code != "0:0", job.describe()
    assert "exiting without MPI_Finalize" in text, job.describe()
    assert "Traceback" not in text, job.describe()


@pytest.mark.timeout(600)
def test_srun_startup_benchmark_runs_on_the_test_cluster(slurm_conf: str, tmp_path: Path) -> None:
    """``python -m benchmarks.srun_startup`` end to end, once (a smoke test:
    nothing about speed is asserted)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SULIS_EXECUTOR_"))}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.srun_startup", "--repeats", "1", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=550,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "srun_startup.md").read_text()
    assert "all 6 workers registered" in table and "step launch" in table
