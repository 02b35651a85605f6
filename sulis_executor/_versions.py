"""One version of ``sulis_executor`` on the client and on every worker.

Calls travel as pickles of this package's objects, and workers run them with
this package's code (:mod:`._remote`), so a worker running another version (a
stale environment on one node, a worker started by hand from another install)
cannot be trusted to run them: it would fail on each, its log filling with
deserialisation errors. So a worker's version is checked, and a mismatch is
an error naming both versions and the worker:

* A scheduler the executor starts (``local``, ``srun``, ``mpi``) checks each
  worker as it registers. Our workers report their version in Dask's
  registration message (``Worker(startup_information=...)``, which arrives as
  its ``extra``); one that reports another version, or none, is answered
  with an error instead of being added (as Dask answers a duplicate name), so
  it never gets a task, and exits printing why. The executor's start-up,
  waiting for its workers, raises :class:`~.errors.VersionMismatchError` on
  the first such refusal. Checking costs no message of its own.
* On a cluster someone else runs (``address``, ``scheduler_file``), whose
  scheduler cannot be told to refuse anything without leaving a plugin behind
  in it, the executor asks the workers present when it starts which version
  they import, with a function sent by value (see :mod:`._version_probe`)
  so that any version can answer, and raises the same error.
"""

from __future__ import annotations

import logging
from typing import Any

from . import __version__, _dask_private
from .errors import VersionMismatchError

logger = logging.getLogger("sulis_executor")

#: The key of a worker's version in its registration's ``extra``.
VERSION_KEY = "sulis_executor"


def worker_startup_information() -> dict[str, Any]:
    """``startup_information`` for our ``Worker``\\ s: report our version."""
    return {VERSION_KEY: _report_version}


def _report_version(worker: Any) -> str:
    return __version__


def mismatch(worker_version: str | None, worker: str, *, reported: bool = True) -> str | None:
    """The error for a worker running ``worker_version``, or ``None`` if it
    matches ours. ``reported=False``: it imports no ``sulis_executor``."""
    if worker_version == __version__:
        return None
    if not reported:
        theirs = "cannot import sulis_executor"
    elif worker_version is None:
        theirs = "runs a sulis_executor from before workers reported their version"
    else:
        theirs = f"runs sulis_executor {worker_version}"
    return (
        f"worker {worker} {theirs}, but this client runs sulis_executor {__version__}; "
        "install the same version wherever workers run (a stale virtual environment "
        "on one node, or workers started from another install?)"
    )


def version_gate() -> Any:
    """A scheduler plugin that refuses workers of another version as they
    register (see the module's docstring)."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    class VersionGate(SchedulerPlugin):
        name = "sulis-executor-version-gate"

        def __init__(self) -> None:
            #: Why each refused worker was refused, in order.
            self.refused: list[str] = []

        async def start(self, scheduler: Any) -> None:
            _dask_private.wrap_handler(scheduler, "register-worker", self._gate)

        def _gate(self, register: Any) -> Any:
            async def register_worker(comm: Any, *, extra: dict[str, Any] | None = None,
                                      name: Any = None, address: str = "", **msg: Any) -> Any:
                error = mismatch((extra or {}).get(VERSION_KEY), f"{name} ({address})")
                if error is None:
                    return await register(comm, extra=extra, name=name, address=address, **msg)
                self.refused.append(error)
                # The constructor raises it, or (later) the worker prints it.
                logger.info("refused a worker: %s", error)
                from distributed.metrics import time

                # As Dask refuses a duplicate name: the worker raises, and exits.
                await comm.write({"status": "error", "message": error, "time": time()})
                return None

            return register_worker

    return VersionGate()


def refused_workers(scheduler: Any) -> list[str]:
    """Why the workers refused so far by ``scheduler``'s gate were refused."""
    gate = getattr(scheduler, "plugins", {}).get("sulis-executor-version-gate")
    return list(gate.refused) if gate is not None else []


def raise_if_refused(scheduler: Any) -> None:
    refused = refused_workers(scheduler)
    if refused:
        more = f" ({len(refused) - 1} more refused)" if len(refused) > 1 else ""
        raise VersionMismatchError(refused[0] + more)


def check_workers(client: Any, timeout: float) -> None:
    """Ask the workers of a cluster someone else runs which version they
    import; raise :class:`VersionMismatchError` naming those that differ
    (``TimeoutError`` if they have not all answered within ``timeout``)."""
    import cloudpickle

    from . import _version_probe

    # By value: a worker with another version, or none, can still run it.
    cloudpickle.register_pickle_by_value(_version_probe)
    # (callback_timeout goes to Client.sync, which bounds the whole call.)
    answers = client.run(_version_probe.imported_version, on_error="return",
                         callback_timeout=timeout)
    differ = {address: answer for address, answer in sorted(answers.items())
              # (An exception: the worker left meanwhile; nothing to check.)
              if not isinstance(answer, BaseException) and tuple(answer) != (True, __version__)}
    if not differ:
        return
    names = {address: info.get("name", "?")
             for address, info in _dask_private.scheduler_info(client)["workers"].items()}
    errors = [mismatch(version, f"{names.get(address, '?')} ({address})", reported=reported) or ""
              for address, (reported, version) in differ.items()]
    more = f" ({len(errors) - 1} more workers differ)" if len(errors) > 1 else ""
    raise VersionMismatchError(errors[0] + more)
