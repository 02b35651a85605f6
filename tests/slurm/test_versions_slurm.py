"""A stale environment on the nodes: ``srun`` workers importing another
version of sulis_executor than the script fail the constructor at once, with
an error naming a worker and both versions (see ``tests/test_versions.py``,
whose ``stale_copy`` makes that version)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.slurm.jobs import REPO, finished_cleanly, submit
from tests.test_versions import STALE, assert_names_worker_and_both_versions, stale_copy  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

SHAPE = ("--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem-per-cpu=500")


def test_srun_workers_of_another_version_fail_the_constructor_naming_both(
        slurm_conf: str, tmp_path: Path, stale_copy: Path) -> None:  # noqa: F811
    # The constructor's timeout far beyond this test's: waiting it out
    # instead of failing at once would fail the test.
    script = tmp_path / "stale.sbatch"
    script.write_text(f"""#!/bin/bash
export PYTHONPATH={stale_copy}:$PYTHONPATH
exec "$PYTHON" {REPO}/tests/stale_workers_script.py '{{"timeout": 900}}'
""")
    job = finished_cleanly(submit(script, tmp_path, slurm_conf, *SHAPE))
    [line] = [line for line in job.text().splitlines() if line.startswith("{")]
    outcome = json.loads(line)
    assert outcome["error"] == "VersionMismatchError", job.describe()
    assert_names_worker_and_both_versions(outcome["message"], "worker srun-")
    # Each refused worker says why in the job's output.
    assert f"runs sulis_executor {STALE}" in job.text().replace(line, "")
