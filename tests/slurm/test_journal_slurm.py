"""The resume journal on the SLURM test cluster (issue 18): a client killed
with SIGKILL mid-``map`` in an srun-mode job; a second job runs only what
the journal lacks, and the combined results equal a serial run's."""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path

import pytest

from sulis_executor import _journal
from tests.slurm.jobs import (
    REPO,
    assert_no_processes_left,
    finished_cleanly,
    poll_job,
    shape,
    submit,
    wait_for_job,
)
from tests.test_journal import assert_serial, executions

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

BATCH = """#!/bin/bash
exec "$PYTHON" "$JOURNAL_SCRIPT" "$JOURNAL" "$MARKS" "$STOP" "$OUT"
"""
STOP = 600


def client_pid(marker: str) -> int | None:
    """The job's client: the Python process running journal_script.py."""
    needle = f"SULIS_TEST_MARKER={marker}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (needle in (proc / "environ").read_bytes().split(b"\0")
                    and b"journal_script.py" in (proc / "cmdline").read_bytes()):
                return int(proc.name)
        except OSError:
            continue
    return None


def test_a_client_killed_mid_map_in_a_job_reruns_only_what_the_journal_lacks(tmp_path, slurm_conf):
    journal, marks = tmp_path / "run.journal", tmp_path / "marks"
    marks.mkdir()
    batch = tmp_path / "journal.sbatch"
    batch.write_text(BATCH)
    env = {"JOURNAL_SCRIPT": str(REPO / "tests" / "journal_script.py"), "JOURNAL": str(journal),
           "MARKS": str(marks), "STOP": str(STOP)}
    first = submit(batch, tmp_path, slurm_conf, *shape(2, 2), "--time=5",
                   env=dict(env, OUT=str(tmp_path / "killed.pickle")), output_name="first.out")
    poll_job(first, lambda: True if journal.exists() and _journal.inspect(str(journal))[0] >= 10
             else None, "the journal did not get 10 records", timeout=300)
    pid = poll_job(first, lambda: client_pid(first.marker), "no client process", timeout=30)
    os.kill(pid, signal.SIGKILL)
    wait_for_job(first, timeout=120)
    assert first.state != "COMPLETED", first.describe()
    assert not (tmp_path / "killed.pickle").exists()
    assert_no_processes_left(first, timeout=60)
    recorded = _journal.inspect(str(journal))[0]
    assert 10 <= recorded < STOP, first.describe()
    for mark in marks.iterdir():
        mark.unlink()

    second = submit(batch, tmp_path, slurm_conf, *shape(2, 2), "--time=5",
                    env=dict(env, OUT=str(tmp_path / "rerun.pickle")), output_name="second.out")
    finished_cleanly(second, timeout=300)
    with open(tmp_path / "rerun.pickle", "rb") as handle:
        assert_serial(pickle.load(handle), STOP)
    ran = executions(marks)
    assert len(ran) == len(set(ran)) == STOP + 1 - recorded, second.describe()
