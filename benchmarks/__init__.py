"""Side-by-side benchmarks of SulisDaskExecutor and its competitors; see README.md."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def checkout_commit() -> str:
    """The commit a results file measured: this checkout's short hash, with
    ``+dirty`` if tracked files differ from it."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
