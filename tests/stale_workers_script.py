"""Start an executor whose workers import another copy of sulis_executor.

    PYTHONPATH=STALE_COPY python tests/stale_workers_script.py [OPTIONS_JSON]

This process imports this checkout's ``sulis_executor`` (put first on
``sys.path`` below), while the workers it starts find the copy in
``STALE_COPY`` first on ``PYTHONPATH``, as workers on a node with a stale
environment would. Prints one JSON line: the type and message of the error
the constructor raised, or ``null`` for both if it raised none.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sulis_executor import SulisDaskExecutor, __version__  # noqa: E402


def main(options: dict[str, object]) -> None:
    assert __version__ in (Path(__file__).resolve().parents[1] / "sulis_executor" / "__init__.py").read_text()
    outcome: dict[str, object] = {"error": None, "message": None, "client_version": __version__}
    try:
        with SulisDaskExecutor(**options) as ex:  # type: ignore[arg-type]
            ex.submit(abs, -1).result()
    except Exception as error:
        outcome.update(error=type(error).__name__, message=str(error))
    print(json.dumps(outcome), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
