"""srun mode at the size users run, on the emulated cluster.

* One import of Dask per node, whatever the tasks per node: in a 2 x 4 job,
  each node has exactly one interpreter that started from scratch (its
  ``python -m sulis_executor._node``; the batch script's on the first node
  besides), however many worker processes it runs.
* A task's CPUs each run a call at once: the Sulis page's single-node job
  (``--ntasks-per-node=1 --cpus-per-task=128``, here 4 CPUs) gets 4 worker
  processes, and 4 calls meet in 4 processes at the same time (a barrier
  across processes, with a deadline); with ``nthreads=1`` it gets one.
* The scale benchmark's quick variant runs end to end (local mode against
  ProcessPoolExecutor, and srun jobs on clusters of its own): every run
  gives its results, writes nothing to stderr and leaves no process
  behind. It asserts no timing: the numbers are for the benchmark's table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm.jobs import REPO, Job, finished_cleanly, result_line, submit

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

FRESH_INTERPRETERS = '''
import json, os
from pathlib import Path
from sulis_executor import SulisDaskExecutor

def processes(marker):
    """pid -> (node, parent pid, executable) of this job's processes."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(line.split("=", 1) for line in (proc / "environ").read_text().split("\\0") if "=" in line)
            if env.get("SULIS_TEST_MARKER") != marker:
                continue
            parent = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
            found[int(proc.name)] = (env.get("SLURMD_NODENAME", "?"), parent, os.readlink(proc / "exe"))
        except OSError:
            continue
    return found

with SulisDaskExecutor() as ex:
    workers = ex.num_workers
    ran_on = sorted(set(ex.map(lambda _: os.environ["SLURMD_NODENAME"], range(200))))
    job = processes(os.environ["SULIS_TEST_MARKER"])
    # A Python process whose parent is not one: it started from scratch
    # (a fork shares its parent's executable).
    python = {pid for pid, (_, _, exe) in job.items() if "python" in os.path.basename(exe)}
    fresh = {}
    for pid in python:
        node, parent, _ = job[pid]
        if parent not in python:
            fresh[node] = fresh.get(node, 0) + 1
    per_node = {}
    for pid in python:
        per_node[job[pid][0]] = per_node.get(job[pid][0], 0) + 1
print("RESULT " + json.dumps({"workers": workers, "ran_on": ran_on, "fresh": fresh,
                              "python": per_node}), flush=True)
'''


CALLS_MEET = '''
import json, os, sys, time
from pathlib import Path
from sulis_executor import SulisDaskExecutor

def meet(room, expected):
    """Arrive in ``room``; True once ``expected`` calls are there at once."""
    Path(room, str(os.getpid())).touch()
    deadline = time.monotonic() + 30
    while len(os.listdir(room)) < expected:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return os.getpid()

room = Path(sys.argv[1]); room.mkdir()
with SulisDaskExecutor() as ex:
    workers = ex.num_workers
    met = [f.result() for f in [ex.submit(meet, str(room), 4) for _ in range(4)]]
default = {"workers": workers, "all_met": all(met), "pids": len(set(met))}
with SulisDaskExecutor(nthreads=1) as ex:
    one_per_task = ex.num_workers
print("RESULT " + json.dumps({**default, "one_per_task": one_per_task}), flush=True)
'''


@pytest.fixture(scope="module")
def submitted(slurm_conf: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    workdir: Path = tmp_path_factory.mktemp("fresh-interpreters")
    (workdir / "fresh.py").write_text(FRESH_INTERPRETERS)
    script = workdir / "job.sbatch"
    script.write_text('#!/bin/bash\n"$PYTHON" fresh.py\n')
    jobs = {"fresh": submit(script, workdir, slurm_conf, "--nodes=2", "--ntasks-per-node=4",
                            "--cpus-per-task=1", "--mem-per-cpu=500")}
    workdir = tmp_path_factory.mktemp("one-task-many-cpus")
    (workdir / "meet.py").write_text(CALLS_MEET)
    script = workdir / "job.sbatch"
    script.write_text(f'#!/bin/bash\n"$PYTHON" meet.py {workdir / "room"}\n')
    jobs["one_task"] = submit(script, workdir, slurm_conf, "--nodes=1", "--ntasks-per-node=1",
                              "--cpus-per-task=4", "--mem-per-cpu=500")
    return jobs


def test_a_task_with_many_cpus_runs_a_call_on_each_at_once(submitted: dict[str, Job]) -> None:
    job = finished_cleanly(submitted["one_task"])
    result = result_line(job)
    assert result == {"workers": 4, "all_met": True, "pids": 4, "one_per_task": 1}, job.describe()


def test_srun_mode_imports_dask_once_per_node_whatever_its_tasks(submitted: dict[str, Job]) -> None:
    job = finished_cleanly(submitted["fresh"])
    result = result_line(job)
    assert result["workers"] == 8 and result["ran_on"] == ["n1", "n2"], job.describe()
    # n1 runs the batch script too (the client, and the scheduler in it).
    assert result["fresh"] == {"n1": 2, "n2": 1}, job.describe()
    # Each node: its node process, its agent and its 4 members (n1: and the client).
    assert result["python"] == {"n1": 7, "n2": 6}, job.describe()


def test_the_scale_benchmark_runs_end_to_end_at_ci_size(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SULIS_EXECUTOR_"))}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--quick", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=840,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "scale.json").read_text())
    runs = {f"local {n} {kind}": record for n, pair in results["local"].items() for kind, record in pair.items()}
    runs.update({f"srun {shape}": record for shape, record in results["srun"].items()})
    assert len(runs) == 2 * 2 + 2, sorted(runs)
    for name, record in runs.items():
        assert "error" not in record, (name, record)
        assert not record.get("stderr", "").strip(), (name, record["stderr"])
        assert not record.get("left_behind"), (name, record)
        assert record["map_items_per_s"] > 0 and 0 < record["sleep_efficiency"] <= 1.05, (name, record)
    for shape, record in results["srun"].items():
        nodes, cpus = map(int, shape.split("x"))
        assert record["workers_seen"] == nodes * cpus, (shape, record)
    assert (tmp_path / "scale.png").stat().st_size > 0
