"""What a worker is asked to learn which ``sulis_executor`` it imports.

Sent by value (``cloudpickle.register_pickle_by_value``, see
:func:`._versions.check_workers`): the worker needs none of this package to
run it, so a worker with another version of it, or without it, can answer.
Keep it free of imports from this package.
"""

from __future__ import annotations


def imported_version() -> tuple[bool, str | None]:
    """``(importable, __version__)`` of the ``sulis_executor`` this process imports."""
    try:
        import sulis_executor
    except ImportError:
        return False, None
    return True, getattr(sulis_executor, "__version__", None)
