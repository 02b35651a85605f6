"""Launch modes, one module each, behind :class:`~.base.Launcher`.

:func:`choose_launcher` is where ``launch='auto'`` is decided; the rule is
documented in the README as a table, and every choice carries its reason.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from ..config import LAUNCH_MODES, ExecutorOptions
from .base import Cluster, Launcher

__all__ = ["Cluster", "Launcher", "choose_launch_mode", "make_launcher"]

# mode -> "module:Class"; modules are imported only when chosen, so that
# e.g. mpi4py is never imported unless the MPI mode is used.
_LAUNCHERS = {
    "local": "local:LocalLauncher",
    "address": "address:AddressLauncher",
}


def choose_launch_mode(options: ExecutorOptions, environ: Mapping[str, str]) -> tuple[str, str]:
    """Return ``(mode, reason)`` for these options and this environment."""
    if options.launch != "auto":
        return options.launch, f"launch={options.launch!r} was given ({options.sources['launch']})"
    if options.address:
        return "address", f"an address was given ({options.sources['address']})"
    if options.scheduler_file:
        return "scheduler_file", f"a scheduler file was given ({options.sources['scheduler_file']})"
    return "local", "no SLURM allocation or MPI world was found"


def make_launcher(mode: str, options: ExecutorOptions, security: object = None) -> Launcher:
    if mode not in LAUNCH_MODES or mode == "auto":
        raise ValueError(f"unknown launch mode {mode!r}; expected one of {', '.join(LAUNCH_MODES)}")
    if mode not in _LAUNCHERS:
        raise NotImplementedError(f"launch={mode!r} is not available in this version")
    module_name, class_name = _LAUNCHERS[mode].split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    launcher: Launcher = getattr(module, class_name)(options, security)
    return launcher
