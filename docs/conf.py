"""Sphinx configuration for the sulis_executor manual.

Built with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``
(``.ci/run`` does so, warnings as errors). Only Sphinx's own extensions and
theme are used, and nothing is fetched from the network: no intersphinx.
"""

from __future__ import annotations

import sys
from pathlib import Path

# autodoc imports the package from this checkout, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sulis_executor  # noqa: E402

project = "sulis_executor"
author = "sulis_executor contributors"
copyright = "the sulis_executor contributors"
release = sulis_executor.__version__
version = release

# napoleon reads the Google-style "Args:" sections of the docstrings.
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]

# The README is not a page of the manual: it links into it.
exclude_patterns = ["_build"]
root_doc = "index"
html_theme = "alabaster"
html_static_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Defaults as written in the source: requeue(environ=os.environ) would
# otherwise print the environment of whoever built the manual.
autodoc_preserve_defaults = True
autodoc_default_options = {"show-inheritance": True}
# ``...`` in the docstrings is code, as in the README and these pages.
default_role = "code"
nitpicky = False
