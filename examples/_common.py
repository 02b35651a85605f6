"""Helpers shared by the example scripts (kept tiny so each example reads
on its own): the problem size from the environment, and one machine-readable
summary line the integration tests check."""

from __future__ import annotations

import json
import os


def problem_size(default: int) -> int:
    """``EXAMPLE_SIZE`` from the environment (the tests use small values)."""
    return int(os.environ.get("EXAMPLE_SIZE", default))


def report(**fields: object) -> None:
    # One line, easy to find in the job output: "RESULT {...}".
    print("RESULT " + json.dumps(fields, sort_keys=True), flush=True)
