"""Realistic load on the runners' modes, as real SLURM jobs (3 nodes x 2 tasks).

``tests/load_workload.py`` submits bursts of tens of thousands of calls,
tiny ones mixed with ones whose arguments are a few kB, then arguments and
results one byte either side of every size threshold the executor has
(sharing a buffer, sharing a whole batch, pushing a result), alone, together
and through ``map``, with three executors in a row. In srun mode and MPI
mode (the two modes whose batches go to runners on a real allocation),
every call must give its right result: a batch whose form depends on its
size or on what it was grouped with must still reach, and run in, whatever
takes it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.slurm.jobs import (
    JOB_SHAPE,
    Job,
    finished_cleanly,
    result_line,
    submit,
    wait_for_mpi_job,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

JOBS = {
    # name -> (batch body, extra environment)
    "srun": ('"$PYTHON" -m tests.load_workload\n', {}),
    "mpi": ('srun --mpi=pmi2 --kill-on-bad-exit=1 "$PYTHON" -m tests.load_workload\n',
            {"LOAD_EXECUTORS": "1"}),
}


@pytest.fixture(scope="module")
def submitted(slurm_conf: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    jobs = {}
    for name, (body, env) in JOBS.items():
        workdir: Path = tmp_path_factory.mktemp(f"load-{name}")
        script = workdir / "job.sbatch"
        script.write_text("#!/bin/bash\n" + body)
        jobs[name] = submit(script, workdir, slurm_conf, *JOB_SHAPE, env=env)
    return jobs


def assert_every_call_right(job: Job, mode: str, executors: int) -> None:
    result = result_line(job)
    assert result["modes"] == [mode] * executors, job.describe()
    assert result["failed"] == {}, f"{result['failed']}\nfirst failures: {result['first']}"
    # 20,000 + 3,000 burst calls per executor, and every threshold checked.
    assert result["calls"] == 23_000 * executors, job.describe()
    # Three checks per size (bytes and bytearray arguments, results), and nine more.
    assert result["checks"] == 3 * len(result["sizes"]) + 9, job.describe()  # type: ignore[arg-type]


def test_srun_mode_runs_every_call_of_bursts_and_threshold_sizes(submitted: dict[str, Job]) -> None:
    job = finished_cleanly(submitted["srun"], timeout=600)
    assert_every_call_right(job, "srun", 3)
    assert result_line(job)["workers"] == [6, 6, 6], job.describe()


@pytest.mark.mpi
def test_mpi_mode_runs_every_call_of_a_burst_and_threshold_sizes(submitted: dict[str, Job]) -> None:
    job = finished_cleanly(submitted["mpi"], timeout=600, wait=wait_for_mpi_job)
    assert_every_call_right(job, "mpi", 1)
    assert result_line(job)["workers"][0] >= 5, job.describe()  # type: ignore[index]
