"""Loaded by every Python process of a recipe job (it is on PYTHONPATH):
shows the ``sulis_executor`` logger's INFO lines, the launch mode and its
reason among them, as ``logging.basicConfig(level=logging.INFO)`` in the
script would. The recipes themselves stay as printed."""

import logging

_handler = logging.StreamHandler()
_handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
_logger = logging.getLogger("sulis_executor")
_logger.addHandler(_handler)
_logger.setLevel(logging.INFO)
