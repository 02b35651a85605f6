"""Each launch mode, end to end, as real SLURM jobs running ``examples/``.

Every job is 3 nodes x 2 tasks; the batch scripts and Python scripts are the
very files in ``examples/``, with small problem sizes. The jobs are submitted
together at the start of the module (the cluster runs two or three at once)
and each test then waits for its own, so the module takes about as long as
its slowest job. Each test checks: the job COMPLETED with exit code 0:0, the
results are right, the promised number of workers took part, there is no
traceback in the output, and no process of the job is left running.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.slurm.jobs import (
    EXAMPLES,
    JOB_SHAPE,
    Job,
    finished_cleanly,
    result_line,
    submit,
    wait_for_job,
    wait_for_mpi_job,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

# name -> (batch script, extra sbatch options, extra environment)
JOBS = {
    # srun self-launch; 2 CPUs per task, each running a worker process.
    "srun": ("srun_example.sbatch",
             ("--nodes=3", "--ntasks-per-node=2", "--cpus-per-task=2", "--mem-per-cpu=500"),
             {"EXAMPLE_SIZE": "50000"}),
    "joblib": ("joblib_example.sbatch", JOB_SHAPE, {"EXAMPLE_SIZE": "300"}),
    "mpi": ("mpi_example.sbatch", JOB_SHAPE, {"EXAMPLE_SIZE": "2000"}),
    "scheduler_file": ("scheduler_file_example.sbatch", JOB_SHAPE, {"EXAMPLE_SIZE": "300"}),
}


@pytest.fixture(scope="module")
def submitted(slurm_conf: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    jobs = {}
    for name, (script, options, env) in JOBS.items():
        workdir: Path = tmp_path_factory.mktemp(f"job-{name}")
        jobs[name] = submit(EXAMPLES / script, workdir, slurm_conf, *options, env=env)
    return jobs


def finished(submitted: dict[str, Job], name: str) -> Job:
    return finished_cleanly(submitted[name], wait=wait_for_mpi_job if name == "mpi" else wait_for_job)


def test_srun_mode_uses_every_task(submitted: dict[str, Job]) -> None:
    job = finished(submitted, "srun")
    result = result_line(job)
    assert result["mode"] == "srun", job.describe()
    assert result["ok"] is True, job.describe()
    # 3 nodes x 2 tasks x 2 CPUs: a worker process per CPU, as
    # ProcessPoolExecutor() runs one per CPU.
    assert result["workers"] == 12, job.describe()
    # A Dask worker per node (its agent), with a thread per worker process of the node.
    assert result["threads"] == [4] * 3, job.describe()
    assert result["nodes"] == ["n1", "n2", "n3"], job.describe()


def test_client_map_and_joblib_via_executor_client(submitted: dict[str, Job]) -> None:
    job = finished(submitted, "joblib")
    result = result_line(job)
    assert result == {"mode": "srun", "ok": True, "workers": 6}, job.describe()


@pytest.mark.mpi
def test_mpi_mode_rank0_runs_script_other_ranks_work(submitted: dict[str, Job]) -> None:
    job = finished(submitted, "mpi")
    result = result_line(job)  # exactly one RESULT: only rank 0 got past the constructor
    assert result["mode"] == "mpi", job.describe()
    assert result["ok"] is True, job.describe()
    assert result["rank"] == "0", job.describe()
    assert result["workers"] >= 5, job.describe()  # type: ignore[operator]
    assert "0" not in result["ranks"], job.describe()  # type: ignore[operator]


def test_scheduler_file_mode_waits_for_every_task(submitted: dict[str, Job]) -> None:
    job = finished(submitted, "scheduler_file")
    result = result_line(job)
    assert result == {"mode": "scheduler_file", "ok": True, "workers": 6}, job.describe()
