"""The README says what the code does: its two commands are the ones that
work and that CI runs, its example runs, its configuration table (and the
manual's) lists every option, and its links into the manual lead somewhere."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import docutils.core
import docutils.utils
import pytest

from sulis_executor.config import OPTIONS

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.rst").read_text()
DOCS = REPO / "docs"

DEMO_COMMAND = "pip install . && python -m sulis_executor demo"
TEST_COMMAND = "pip install '.[test]' && python -m pytest"

pytestmark = pytest.mark.timeout(60)


def code_blocks(language: str) -> list[str]:
    blocks = []
    for match in re.finditer(rf"\.\. code-block:: {language}\n\n((?:    .*\n|\n)+)", README):
        blocks.append("\n".join(line[4:] for line in match.group(1).splitlines()))
    return blocks


def docs_links() -> set[str]:
    """Every ``docs/...`` file the README points at, as a link target or as text."""
    return set(re.findall(r"\bdocs/[\w/.-]+\.rst\b", README))


def environment_without_a_cluster() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DASK_"))}
    env["PYTHONPATH"] = str(REPO)
    return env


def test_every_option_is_in_the_readmes_table_with_its_variable():
    for option in OPTIONS.values():
        assert f"``{option.name}``" in README, option.name
        assert f"``{option.env_var}``" in README, option.env_var


def test_the_readme_states_the_rule_that_names_the_dask_config_keys():
    # The README gives the rule rather than a column of keys; the rule must hold.
    assert "``sulis-executor.`` and the name with dashes" in README
    assert "``SULIS_EXECUTOR_`` and the name in capitals" in README
    for option in OPTIONS.values():
        assert option.dask_key == "sulis-executor." + option.name.replace("_", "-")
        assert option.env_var == "SULIS_EXECUTOR_" + option.name.upper()


def test_every_option_is_in_the_manuals_configuration_table_with_its_variable_and_dask_key():
    table = (DOCS / "configuration.rst").read_text()
    for option in OPTIONS.values():
        assert f"``{option.name}``" in table, option.name
        assert f"``{option.env_var}``" in table, option.env_var
        assert f"``{option.dask_key}``" in table, option.dask_key


def test_ci_runs_the_readmes_test_command():
    assert TEST_COMMAND in README
    assert TEST_COMMAND in (REPO / ".ci" / "run").read_text()


def test_the_readmes_demo_command_runs_quietly():
    assert DEMO_COMMAND in README
    demo = DEMO_COMMAND.split(" && ", 1)[1].split()
    assert demo[0] == "python"
    proc = subprocess.run([sys.executable, *demo[1:]], cwd=REPO, env=environment_without_a_cluster(),
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr
    assert "startup" in proc.stdout and "shutdown" in proc.stdout, proc.stdout
    assert proc.stderr == ""


def test_the_quick_start_example_runs_unchanged():
    quick_start = code_blocks("python")[0]
    assert "SulisDaskExecutor" in quick_start
    script = "def f(x):\n    return x * x\ninputs = range(20)\n" + quick_start + "\nprint(results)\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=environment_without_a_cluster(),
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str([x * x for x in range(20)])
    assert proc.stderr == ""


def test_the_readmes_batch_script_is_the_common_sulis_case():
    script = code_blocks("bash")[0]
    assert "#SBATCH --ntasks-per-node=128" in script
    assert "#SBATCH --cpus-per-task=1" in script
    assert "SULIS_EXECUTOR_INTERFACE=ib0" in script
    # srun mode: the executor starts the workers, so python runs bare.
    assert script.rstrip().splitlines()[-1] == "python script.py"


def test_every_docs_file_the_readme_names_exists():
    links = docs_links()
    assert links, "the README should link into the manual"
    missing = sorted(link for link in links if not (REPO / link).is_file())
    assert not missing, f"README links to files that do not exist: {missing}"


def test_the_readme_links_to_every_page_of_the_manual():
    pages = {f"docs/{page.name}" for page in DOCS.glob("*.rst") if page.name != "index.rst"}
    assert not pages - docs_links(), f"pages the README does not link to: {sorted(pages - docs_links())}"


def test_the_readme_renders_without_docutils_warnings():
    # PyPI renders it as the long description (setup.cfg) and shows nothing
    # at all if docutils finds an error.
    try:
        docutils.core.publish_doctree(README, settings_overrides={
            "halt_level": 2, "report_level": 2, "warning_stream": io.StringIO()})
    except docutils.utils.SystemMessage as problem:
        pytest.fail(f"README.rst: {problem}")
