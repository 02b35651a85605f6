"""The README says what the code does: its examples run, its configuration
table lists every option, and CI runs the test command it gives."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sulis_executor.config import OPTIONS

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.rst").read_text()

pytestmark = pytest.mark.timeout(60)


def code_blocks(language: str) -> list[str]:
    blocks = []
    for match in re.finditer(rf"\.\. code-block:: {language}\n\n((?:    .*\n|\n)+)", README):
        blocks.append("\n".join(line[4:] for line in match.group(1).splitlines()))
    return blocks


def test_every_option_is_in_the_configuration_table_with_its_variable_and_dask_key():
    for option in OPTIONS.values():
        assert f"``{option.name}``" in README, option.name
        assert f"``{option.env_var}``" in README, option.env_var
        assert f"``{option.dask_key}``" in README, option.dask_key


def test_ci_runs_the_readmes_test_command():
    test_command = "pip install '.[test]' && python -m pytest"
    assert test_command in README
    assert test_command in (REPO / ".ci" / "run").read_text()


def test_the_quick_start_example_runs_unchanged():
    quick_start = code_blocks("python")[0]
    assert "SulisDaskExecutor" in quick_start
    script = "def f(x):\n    return x * x\ninputs = range(20)\n" + quick_start + "\nprint(results)\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DASK_"))}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str([x * x for x in range(20)])
    assert proc.stderr == ""
