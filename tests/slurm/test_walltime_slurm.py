"""The job's time limit and SLURM's early-warning SIGUSR1, on the test
cluster: a map that cannot finish in time stops starting calls, fails the
rest with WalltimeExceeded, and the job ends cleanly (COMPLETED, not
TIMEOUT), its script having printed what finished. With the resume journal
on, what finished is recorded, and a second job runs only the rest: each
call's executions are counted (a file per execution), and the combined
results equal a serial run's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm.jobs import (
    Job,
    finished_cleanly,
    poll_job,
    result_line,
    scancel,
    shape,
    submit,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(400)]

SCRIPT = '''\
import json
import os
import sys
import time
import uuid
from concurrent.futures import TimeoutError

from sulis_executor import SulisDaskExecutor


def slow(x):
    calls = os.environ.get("CALLS_DIR")
    if calls:  # one file per execution
        open(os.path.join(calls, f"{os.environ['RUN_TAG']}-{x}-{uuid.uuid4().hex}"), "w").close()
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
    ok = done == [i * i for i in range(len(done))]  # a serial run's, as far as it got
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


def submit_slow_map(slurm_conf: str, tmp_path: Path, workdir: Path, minutes: int,
                    env: dict[str, str]) -> Job:
    """240 one-second calls on one node's 2 tasks, with ``minutes`` of wall time."""
    workdir.mkdir(exist_ok=True)
    return submit(_batch(tmp_path, 240), workdir, slurm_conf, f"--time={minutes}", *shape(1, 2),
                  env=env)


def journal_calls(path: Path) -> int:
    """How many calls ``sulis-executor journal`` says the journal holds."""
    out = subprocess.run([sys.executable, "-m", "sulis_executor", "journal", str(path)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    match = re.search(r"(\d+) calls", out)
    assert match, out
    return int(match.group(1))


def executions(calls: Path, tag: str) -> dict[int, int]:
    counted: dict[int, int] = {}
    for name in (p.name for p in calls.iterdir() if p.name.startswith(tag + "-")):
        x = int(name.split("-")[1])
        counted[x] = counted.get(x, 0) + 1
    return counted


def test_map_past_the_time_limit_ends_cleanly_and_a_second_job_runs_only_the_rest(
        slurm_conf: str, tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    calls.mkdir()
    journal = tmp_path / "run.journal"
    env = {"SULIS_EXECUTOR_WALLTIME_MARGIN": "15", "SULIS_EXECUTOR_JOURNAL": str(journal),
           "CALLS_DIR": str(calls)}
    # 240 one-second calls on 2 workers need two minutes; the job has one.
    job = submit_slow_map(slurm_conf, tmp_path, tmp_path / "first", 1, {**env, "RUN_TAG": "first"})
    finished_cleanly(job, timeout=200)
    result = result_line(job)
    assert result["ok"] is True, job.describe()
    assert 0 < int(result["finished"]) < 240, job.describe()  # type: ignore[call-overload]
    error = str(result["error"])
    assert error.startswith("WalltimeExceeded: the job's time limit is near"), job.describe()
    assert "calls finished" in error and "were running and" in error and "were not started" in error, job.describe()
    assert job.text().count("no more calls start") == 1, job.describe()
    recorded = journal_calls(journal)
    assert recorded >= int(result["finished"]), job.describe()  # type: ignore[call-overload]

    # The rerun, with time enough: only what the journal lacks runs.
    rerun = submit_slow_map(slurm_conf, tmp_path, tmp_path / "second", 5,
                            {**env, "RUN_TAG": "second"})
    finished_cleanly(rerun, timeout=300)
    again = result_line(rerun)
    assert again["ok"] is True and again["finished"] == 240 and again["error"] is None, rerun.describe()
    ran = executions(calls, "second")
    assert sum(ran.values()) == 240 - recorded and max(ran.values()) == 1, (recorded, ran)
    assert journal_calls(journal) == 240


def test_sigusr1_stops_starting_calls(slurm_conf: str, tmp_path: Path) -> None:
    job = submit_slow_map(slurm_conf, tmp_path, tmp_path, 5,
                          {"SULIS_EXECUTOR_JOURNAL": str(tmp_path / "run.journal")})
    # Once calls run, the batch shell (exec'd into python) gets SIGUSR1.
    poll_job(job, lambda: True if "STARTED" in job.text() else None, "the map to start", 120)
    scancel(job, "--batch", "--signal=USR1", check=True)
    finished_cleanly(job, timeout=120)
    result = result_line(job)
    assert result["ok"] is True, job.describe()
    assert 0 < int(result["finished"]) < 240, job.describe()  # type: ignore[call-overload]
    assert str(result["error"]).startswith("WalltimeExceeded: SIGUSR1 received"), job.describe()
    assert int(result["seconds"]) < 200, job.describe()  # type: ignore[call-overload]
    # Nothing that finished is lost: the journal holds every result the script read.
    assert journal_calls(tmp_path / "run.journal") >= int(result["finished"])  # type: ignore[call-overload]
