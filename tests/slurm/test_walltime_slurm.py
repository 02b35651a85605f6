"""The job's time limit and SLURM's early-warning SIGUSR1, on the test
cluster: a map that cannot finish in time stops starting calls, fails the
rest with WalltimeExceeded, and the job ends cleanly (COMPLETED, not
TIMEOUT), its script having printed what finished."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.slurm.jobs import (
    finished_cleanly,
    poll_job,
    result_line,
    scancel,
    submit,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(400)]

SCRIPT = '''\
import json
import os
import sys
import time
from concurrent.futures import TimeoutError

from sulis_executor import SulisDaskExecutor


def slow(x):
    time.sleep(1.0)
    return x * x


if __name__ == "__main__":
    n = int(sys.argv[1])
    done = []
    error = None
    started = time.time()
    with SulisDaskExecutor() as ex:
        try:
            for i, value in enumerate(ex.map(slow, range(n), chunksize=1)):
                done.append(value)
                if i == 0:
                    print("STARTED", flush=True)
        except TimeoutError as exc:
            error = f"{type(exc).__name__}: {exc}"
    ok = done == [i * i for i in range(len(done))]
    print("RESULT " + json.dumps({"finished": len(done), "ok": ok, "error": error,
                                  "seconds": round(time.time() - started)}), flush=True)
'''

BATCH = '''\
#!/bin/bash
exec "$PYTHON" {script} {n}
'''


def _batch(tmp_path: Path, n: int) -> Path:
    script = tmp_path / "slow_map.py"
    script.write_text(SCRIPT)
    batch = tmp_path / "slow_map.sbatch"
    batch.write_text(BATCH.format(script=script, n=n))
    return batch


def test_map_past_the_time_limit_ends_cleanly(slurm_conf: str, tmp_path: Path) -> None:
    # 240 one-second calls on 2 workers need two minutes; the job has one.
    job = submit(_batch(tmp_path, 240), tmp_path, slurm_conf, "--time=1", "--nodes=1",
                 "--ntasks=2", "--cpus-per-task=1", "--mem-per-cpu=500",
                 env={"SULIS_EXECUTOR_WALLTIME_MARGIN": "15"})
    finished_cleanly(job, timeout=200)
    result = result_line(job)
    assert result["ok"] is True, job.describe()
    assert 0 < int(result["finished"]) < 240, job.describe()  # type: ignore[call-overload]
    error = str(result["error"])
    assert error.startswith("WalltimeExceeded: the job's time limit is near"), job.describe()
    assert "calls finished" in error and "were running and" in error and "were not started" in error, job.describe()
    assert job.text().count("no more calls start") == 1, job.describe()


def test_sigusr1_stops_starting_calls(slurm_conf: str, tmp_path: Path) -> None:
    job = submit(_batch(tmp_path, 240), tmp_path, slurm_conf, "--time=5", "--nodes=1",
                 "--ntasks=2", "--cpus-per-task=1", "--mem-per-cpu=500")
    # Once calls run, the batch shell (exec'd into python) gets SIGUSR1.
    poll_job(job, lambda: True if "STARTED" in job.text() else None, "the map to start", 120)
    scancel(job, "--batch", "--signal=USR1", check=True)
    finished_cleanly(job, timeout=120)
    result = result_line(job)
    assert result["ok"] is True, job.describe()
    assert 0 < int(result["finished"]) < 240, job.describe()  # type: ignore[call-overload]
    assert str(result["error"]).startswith("WalltimeExceeded: SIGUSR1 received"), job.describe()
    assert int(result["seconds"]) < 200, job.describe()  # type: ignore[call-overload]
