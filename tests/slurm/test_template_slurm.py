"""Batch scripts written by ``sulis-executor template`` run as real jobs on
the test cluster, and the executor in them uses every task of the allocation.
(The mpi template is the examples' mpi_example.sbatch command, which
test_launch_modes_slurm.py runs.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sulis_executor._template import DEFAULT_TASKS_PER_NODE
from tests.slurm.jobs import (
    REPO,
    finished_cleanly,
    job_env,
    result_line,
    slurm_command,
    submit,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

SCRIPT = '''\
import json
import sys

from sulis_executor import SulisDaskExecutor
from sulis_executor import progress


def square(x):
    return x * x


if __name__ == "__main__":
    n = int(sys.argv[1])
    with SulisDaskExecutor() as ex:
        results = list(progress(ex.map(square, range(n)), total=n, desc="squares"))
        info = {"mode": ex.launch_mode, "workers": ex.num_workers,
                "ok": results == [i * i for i in range(n)]}
    print("RESULT " + json.dumps(info), flush=True)
'''


@pytest.mark.parametrize("mode, launch_mode", [("srun", "srun"),
                                               ("scheduler-file", "scheduler_file")])
def test_template_runs_as_a_job(mode: str, launch_mode: str, slurm_conf: str,
                                tmp_path: Path) -> None:
    script = tmp_path / "squares.py"
    script.write_text(SCRIPT)
    batch = tmp_path / "squares.sbatch"
    env = job_env(slurm_conf, "template-render")
    result = subprocess.run(
        [sys.executable, "-m", "sulis_executor", "template", mode,
         "--nodes", "3", "--ntasks-per-node", "2", "--cpus-per-task", "1",
         "--mem-per-cpu", "500", "--time", "00:05:00", "-o", str(batch),
         str(script), "200"],
        env=env, capture_output=True, text=True, check=False, timeout=60, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    job = finished_cleanly(submit(batch, tmp_path, slurm_conf))
    assert result_line(job) == {"mode": launch_mode, "workers": 6, "ok": True}, job.describe()
    # The progress bar in the job's output file: plain lines, final count.
    assert "\r" not in job.text(), job.describe()
    assert "squares: 100%" in job.text() and "200/200" in job.text(), job.describe()


def declared_cpus_per_node(slurm_conf: str) -> int:
    """The CPUs every node of the test cluster declares (``cluster.sh``)."""
    found = {int(n) for n in re.findall(r"^NodeName=.* CPUs=(\d+)", Path(slurm_conf).read_text(), re.M)}
    assert len(found) == 1, found
    return found.pop()


def test_template_fills_whole_nodes_from_sinfo(slurm_conf: str, tmp_path: Path) -> None:
    # Written on the cluster's login node without --ntasks-per-node: a node's
    # CPUs, as sinfo reports them (a Sulis user gets 128), over the CPUs per
    # task; the job then runs a worker process on every CPU.
    cpus = declared_cpus_per_node(slurm_conf)
    assert cpus % 2 == 0 and cpus // 2 != DEFAULT_TASKS_PER_NODE
    script = tmp_path / "squares.py"
    script.write_text(SCRIPT)
    batch = tmp_path / "whole-nodes.sbatch"
    env = job_env(slurm_conf, "template-whole-nodes")
    result = subprocess.run(
        slurm_command(slurm_conf, sys.executable, "-m", "sulis_executor", "template", "srun",
                      "--nodes", "2", "--cpus-per-task", "2", "--mem-per-cpu", "300", "--time", "00:05:00",
                      "-o", str(batch), str(script), "100"),
        env=env, capture_output=True, text=True, check=False, timeout=60, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert f"#SBATCH --ntasks-per-node={cpus // 2}\n" in batch.read_text()
    assert f"sinfo reports {cpus} CPUs per node" in result.stderr, result.stderr
    job = finished_cleanly(submit(batch, tmp_path, slurm_conf))
    assert result_line(job) == {"mode": "srun", "workers": 2 * cpus, "ok": True}, job.describe()
