"""The one place where executor options are resolved.

Every option can be given four ways, and the first one found wins:

1. an explicit keyword argument to :class:`~sulis_executor.SulisDaskExecutor`;
2. an environment variable ``SULIS_EXECUTOR_<NAME>`` (so a job script can
   change behaviour without touching code);
3. the Dask config key ``sulis-executor.<name>`` (``~/.config/dask/*.yaml``,
   or ``DASK_SULIS_EXECUTOR__<NAME>``);
4. the default.

Resolution happens when an executor is constructed, never at import, and the
result records where each value came from so ``sulis-executor info`` can say.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["LAUNCH_MODES", "OPTIONS", "ExecutorOptions", "Option", "resolve_options"]

LAUNCH_MODES = ("auto", "local", "attach", "address", "scheduler_file", "srun", "mpi")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError("expected a boolean (true/false, 1/0, yes/no)")


def _parse_positive_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("expected a positive integer")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError("expected a positive integer") from None
    if number <= 0 or (isinstance(value, float) and value != number):
        raise ValueError("expected a positive integer")
    return number


#: Start methods ``mp_context`` may name; see ``_parse_start_method``.
START_METHODS = ("fork", "forkserver", "spawn")


def _parse_start_method(value: Any) -> str | None:
    """A ``multiprocessing`` context (what ``ProcessPoolExecutor`` takes) or
    the name of its start method, as the name."""
    if value is None:
        return None
    method = value.get_start_method() if hasattr(value, "get_start_method") else value
    if isinstance(method, str) and method.strip().lower() in START_METHODS:
        return method.strip().lower()
    raise ValueError("expected a multiprocessing context, e.g. multiprocessing.get_context('spawn'), "
                     f"or one of {', '.join(START_METHODS)}")


def _parse_seconds(value: Any) -> float:
    if isinstance(value, str):
        # Accept Dask's "30s", "2 minutes", ... as well as plain numbers.
        import dask.utils

        try:
            seconds = float(dask.utils.parse_timedelta(value.strip(), default="seconds"))
        except Exception:
            raise ValueError("expected a number of seconds, e.g. 60 or '2 minutes'") from None
    else:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            raise ValueError("expected a number of seconds, e.g. 60 or '2 minutes'") from None
    if not seconds > 0 or math.isnan(seconds):
        raise ValueError("expected a positive number of seconds")
    return seconds


def _parse_launch(value: Any) -> str:
    mode = str(value).strip().lower().replace("-", "_")
    if mode not in LAUNCH_MODES:
        raise ValueError(f"expected one of {', '.join(LAUNCH_MODES)}")
    return mode


def _parse_optional_str(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _parse_wait_for_workers(value: Any) -> float | int | None:
    """A worker count (an integer >= 1) or a fraction of the expected workers
    (a number in (0, 1]); ``None`` means all of them."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a worker count (e.g. 6) or a fraction (e.g. 0.8)") from None
    if number <= 0 or math.isnan(number):
        raise ValueError("expected a positive worker count or a fraction in (0, 1]")
    if number <= 1 and (isinstance(value, float) or "." in str(value)):
        return number
    if number != int(number):
        raise ValueError("expected a whole worker count above 1, or a fraction in (0, 1]")
    return int(number)


def _parse_memory_limit(value: Any) -> str | int | None:
    """Anything Dask accepts (``"4GB"``, ``"auto"``, a byte count, ``0`` for
    no limit); checked here so a typo fails before any process starts."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("expected a non-negative byte count")
        return int(value)
    text = str(value).strip()
    if text.lower() == "auto":
        return "auto"
    import dask.utils

    try:
        dask.utils.parse_bytes(text)
    except Exception:
        raise ValueError("expected a size such as '4GB', '3500MiB', 'auto' or a byte count") from None
    return text


def _parse_dashboard(value: Any) -> str | None:
    """``False``/``None``: off. ``True``: localhost on a random port.
    A string: the address to bind, e.g. ``":0"`` or ``"0.0.0.0:8787"``."""
    if value is None or value is False:
        return None
    if value is True:
        return "127.0.0.1:0"
    text = str(value).strip()
    if text.lower() in _FALSE:
        return None
    if text.lower() in _TRUE:
        return "127.0.0.1:0"
    return text


def _parse_security(value: Any) -> Any:
    """``True``: TLS with credentials made for this job (when the executor
    starts the cluster). ``False``: plain TCP, unsafe on shared machines. A
    ``distributed.Security`` object: used as given (for clusters you run)."""
    if isinstance(value, (bool, str)):
        return _parse_bool(value)
    if type(value).__name__ == "Security":
        return value
    raise ValueError("expected True, False or a distributed.Security object")


@dataclasses.dataclass(frozen=True)
class Option:
    """One executor option: its default, how to parse it, and what it means."""

    name: str
    default: Any
    parse: Callable[[Any], Any]
    doc: str

    @property
    def env_var(self) -> str:
        return "SULIS_EXECUTOR_" + self.name.upper()

    @property
    def dask_key(self) -> str:
        return "sulis-executor." + self.name.replace("_", "-")


OPTIONS: dict[str, Option] = {
    option.name: option
    for option in (
        Option("max_workers", None, _parse_positive_int,
               "Workers of a local cluster (default: the CPUs this process may use)."),
        Option("max_tasks_per_child", None, _parse_positive_int,
               "Tasks a local worker process runs before a fresh one replaces it (default: no limit)."),
        Option("mp_context", None, _parse_start_method,
               "How local workers start: 'spawn' (each a fresh interpreter) or 'fork' and "
               "'forkserver' (forked from a fork server; the default where there is one)."),
        Option("launch", "auto", _parse_launch,
               "How to get a cluster: " + ", ".join(LAUNCH_MODES) + "."),
        Option("address", None, _parse_optional_str,
               "Scheduler address to attach to (implies launch='address')."),
        Option("scheduler_file", None, _parse_optional_str,
               "Scheduler file to attach to (implies launch='scheduler_file')."),
        Option("interface", None, _parse_optional_str,
               "Network interface for Dask comms, e.g. 'ib0' or 'lo'."),
        Option("nthreads", None, _parse_positive_int,
               "srun mode: worker processes per SLURM task, each running one call "
               "(default: cpus-per-task; 1 for one call per task with all its CPUs)."),
        Option("memory_limit", None, _parse_memory_limit,
               "Memory per worker (local: Dask's 'auto'; SLURM: the job's memory)."),
        Option("local_directory", None, _parse_optional_str,
               "Scratch directory for workers (default: Dask's temporary directory)."),
        Option("wait_for_workers", None, _parse_wait_for_workers,
               "Workers to wait for at start: a count, or a fraction of those expected."),
        Option("timeout", 60.0, _parse_seconds,
               "Deadline in seconds for the cluster to start or be found."),
        Option("walltime_margin", 60.0, _parse_seconds,
               "In a SLURM job: seconds before the time limit (plus the calls' measured "
               "duration) after which no call starts; those left fail with WalltimeExceeded."),
        Option("dashboard", None, _parse_dashboard,
               "Dashboard address; off by default, True binds localhost on a random port."),
        Option("verbose", False, _parse_bool,
               "Let Dask's own logs through (they are silenced by default)."),
        Option("security", True, _parse_security,
               "TLS with per-job credentials (True), plain TCP (False, unsafe on "
               "shared machines), or a distributed.Security object."),
        Option("journal", None, _parse_optional_str,
               "Resume journal: a file recording finished calls, so a rerun skips them "
               "(off by default)."),
    )
}


@dataclasses.dataclass(frozen=True)
class ExecutorOptions:
    """Resolved options; ``sources`` says where each value came from."""

    max_workers: int | None = None
    max_tasks_per_child: int | None = None
    mp_context: str | None = None
    launch: str = "auto"
    address: str | None = None
    scheduler_file: str | None = None
    interface: str | None = None
    nthreads: int | None = None
    memory_limit: str | int | None = None
    local_directory: str | None = None
    wait_for_workers: float | int | None = None
    timeout: float = 60.0
    walltime_margin: float = 60.0
    dashboard: str | None = None
    verbose: bool = False
    security: Any = True
    journal: str | None = None
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)


def _dask_config_get(key: str) -> Any:
    import dask.config

    return dask.config.get(key, default=None)


def resolve_options(
    explicit: Mapping[str, Any],
    environ: Mapping[str, str],
    dask_config_get: Callable[[str], Any] = _dask_config_get,
) -> ExecutorOptions:
    """Resolve every option: explicit > environment > Dask config > default.

    ``explicit`` holds keyword arguments; a ``None`` value counts as not given.
    Raises :class:`TypeError` for an unknown keyword and :class:`ValueError`
    naming the argument or variable, and its value, for a bad value.
    """
    unknown = sorted(set(explicit) - set(OPTIONS))
    if unknown:
        raise TypeError(
            f"SulisDaskExecutor() got an unexpected keyword argument {unknown[0]!r}; "
            f"valid options are: {', '.join(sorted(OPTIONS))}"
        )
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS.values():
        candidates = (
            (explicit.get(option.name), f"argument {option.name}="),
            (environ.get(option.env_var), f"environment variable {option.env_var}"),
            (dask_config_get(option.dask_key), f"Dask config {option.dask_key}"),
        )
        for raw, source in candidates:
            if raw is not None:
                try:
                    values[option.name] = option.parse(raw)
                except ValueError as error:
                    # "argument timeout=" already ends in "="; the others do not.
                    named = source if source.endswith("=") else f"{source}="
                    raise ValueError(f"{named}{raw!r} is invalid: {error}") from None
                sources[option.name] = source
                break
        else:
            values[option.name] = option.default
            sources[option.name] = "default"
    return ExecutorOptions(**values, sources=sources)
