"""The manual (docs/) covers what the package exports and what its messages
point at. .ci/run builds it with warnings as errors, which catches broken
cross-references and docstrings; these check what a clean build cannot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import sulis_executor
from sulis_executor import _dask_private
from tests.test_cli import cli, load_env_dump

DOCS = Path(__file__).resolve().parent.parent / "docs"


def section(page: str, title: str) -> str:
    """The text of a page's section, from its title to the next title."""
    text = (DOCS / page).read_text()
    start = text.index(f"\n{title}\n")
    following = re.search(r"\n[^\n]+\n[-=~]{3,}\n", text[start + len(title) + 2:])
    return text[start:start + len(title) + 2 + following.start()] if following else text[start:]


def test_the_api_reference_documents_every_public_name():
    api = (DOCS / "api.rst").read_text()
    documented = set(re.findall(r"^\.\. auto(?:class|exception|function):: sulis_executor\.(\w+)$",
                                api, re.MULTILINE))
    assert documented == set(sulis_executor.__all__)


def test_the_old_dask_error_points_at_a_page_that_states_the_floor():
    with pytest.raises(ImportError) as info:
        _dask_private.check_versions({"dask": "2024.12.1", "distributed": "2024.12.1"})
    assert "docs/install.rst, 'Dask versions'" in str(info.value)
    assert _dask_private.MINIMUM in section("install.rst", "Dask versions")


def test_the_info_example_is_what_the_command_prints_for_that_allocation():
    # docs/cli.rst shows `sulis-executor info` in a 3-node batch script; the
    # captured environment of such a script must still print exactly that.
    shown = section("cli.rst", "``info``").split("    $ sulis-executor info\n", 1)[1]
    shown = "\n".join(line[4:] for line in shown.split("\n\n", 1)[0].splitlines())
    result = cli("info", extra_env=load_env_dump("batch_step_multinode.env"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == shown.strip()
