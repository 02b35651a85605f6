"""A call that records each of its executions, for jobs that lose a node
mid-map (tests/slurm/test_faults_slurm.py, test_network_slurm.py): Dask may
run again a call whose worker was lost, and the record tells which ran,
where, and how often. Imported by the job's workers (the repository is on
their PYTHONPATH); the record is ``executions.log`` in the job's directory,
every task's working directory."""

from __future__ import annotations

import os
import time
from pathlib import Path

LOG = "executions.log"


def square(i: int) -> int:
    """``i * i``, after a line ``i NODE`` in the record and 30 ms."""
    with open(LOG, "a") as f:
        f.write(f"{i} {os.environ.get('SLURMD_NODENAME')}\n")
    time.sleep(0.03)
    return i * i


def summary(n: int) -> dict[str, object]:
    """Whether each of ``range(n)`` ran, and how many ran more than once."""
    executions: dict[int, list[str]] = {}
    for line in Path(LOG).read_text().splitlines():
        i, node = line.split()
        executions.setdefault(int(i), []).append(node)
    return {"executed": sorted(executions) == list(range(n)),
            "reruns": sum(len(v) - 1 for v in executions.values())}
