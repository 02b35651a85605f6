"""Every use of Dask's private APIs, and every difference between the Dask
versions we support, in one place.

The executor leans on a few things Dask does not promise to keep: the
client's graph submission below ``Client.submit`` (to mark tasks as data
producers, which the scheduler queues), the batched streams between client,
scheduler and workers (their send interval, and extra message handlers on
them), the scheduler's and workers' task states, the scheduler's handler of
worker registrations, and the context variables that name the current
worker and the default client. Nothing else in the package touches them:
it calls the functions here.

The installed ``dask`` and ``distributed`` are checked once, when this
module is first imported (that is, when the executor or a worker starts):
an older release than :data:`MINIMUM` raises :class:`ImportError` naming
both versions. A newer release than we have tested is tried; if one of the
private names below has gone, the function using it raises
:class:`RuntimeError` naming it and the installed versions.

Why the floor is 2025.1.0 (see also docs/install.rst, "Dask versions"): it is the
first release whose ``dask._task_spec.Task`` takes ``_data_producer``, the
mark that makes the scheduler queue our tasks until a worker thread is
free, first in first out, as ``ProcessPoolExecutor`` hands out calls.
Before it, a task goes to a worker at once, possibly behind a long call
while another worker idles. Differences handled here, measured:

* ``Client.scheduler_info()``: before 2025.4 it takes no ``n_workers`` and
  reports no ``total_threads``; from 2025.4 to 2026.6 it lists at most 5
  workers unless asked for all (``n_workers=-1``).
* ``Client._graph_to_futures``: a graph (a dict of tasks) before 2025.4, a
  ``dask._expr.LLGExpr`` since.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Iterable
from typing import Any

#: The oldest ``dask`` and ``distributed`` release we support (and test).
MINIMUM = "2025.1.0"
#: The newest release we have tested.
NEWEST_TESTED = "2026.8.0"


def _release(version: str) -> tuple[int, ...]:
    """``"2025.1.0"`` -> ``(2025, 1, 0)``; local and dev suffixes ignored."""
    numbers = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in numbers.group().split(".")) if numbers else ()


def _installed(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:  # e.g. a source tree on sys.path
        module = __import__(name)
        return str(getattr(module, "__version__", "0"))


def installed_versions() -> dict[str, str]:
    """The installed ``dask`` and ``distributed`` versions."""
    return {name: _installed(name) for name in ("dask", "distributed")}


def check_versions(versions: dict[str, str] | None = None) -> None:
    """Raise ``ImportError`` unless ``dask`` and ``distributed`` are both
    at least :data:`MINIMUM` (``versions``: as ``installed_versions()``)."""
    versions = versions if versions is not None else installed_versions()
    old = {name: version for name, version in versions.items()
           if _release(version) < _release(MINIMUM)}
    if old:
        found = ", ".join(f"{name} {version}" for name, version in versions.items())
        raise ImportError(
            f"sulis_executor needs dask and distributed {MINIMUM} or newer (tested up to "
            f"{NEWEST_TESTED}), but found {found}; older releases are not supported (see "
            f"docs/install.rst, 'Dask versions'): pip install 'dask[distributed]>={MINIMUM}'"
        )


check_versions()


def _missing(what: str) -> RuntimeError:
    found = ", ".join(f"{name} {version}" for name, version in installed_versions().items())
    return RuntimeError(
        f"sulis_executor relies on Dask's private {what}, which the installed {found} "
        f"does not have; supported: dask and distributed {MINIMUM} to {NEWEST_TESTED} "
        f"(newer ones as long as they keep it)"
    )


# -- the client ----------------------------------------------------------------


@functools.cache
def _scheduler_info_takes_n_workers() -> bool:
    from distributed import Client

    return "n_workers" in inspect.signature(Client.scheduler_info).parameters


def scheduler_info(client: Any) -> dict[str, Any]:
    """``client.scheduler_info()`` listing every worker (from 2025.4 to
    2026.6 it lists at most 5 unless asked for all)."""
    if _scheduler_info_takes_n_workers():
        return dict(client.scheduler_info(n_workers=-1))
    return dict(client.scheduler_info())


def worker_count(client: Any) -> int:
    """The workers the scheduler has now."""
    return len(scheduler_info(client)["workers"])


def total_threads(client: Any) -> int:
    """The worker threads the scheduler has now: ``total_threads`` where
    the scheduler reports it (2025.4 on; asking for no worker's details),
    else the sum over every worker's ``nthreads``."""
    if _scheduler_info_takes_n_workers():
        info = client.scheduler_info(n_workers=0)
        if "total_threads" in info:
            return int(info["total_threads"] or 0)
    return sum(int(worker.get("nthreads") or 0) for worker in scheduler_info(client)["workers"].values())


def default_clients() -> list[Any]:
    """The clients open in this process, newest first: the current one (of
    ``with client:``, or a worker's), then the registry of default clients."""
    from distributed import client as dask_client

    clients: list[Any] = []
    current = getattr(dask_client, "_current_client", None)
    if current is not None:
        clients.append(current.get())
    registry = getattr(dask_client, "_global_clients", None)
    if registry is not None:
        clients += [registry.get(key) for key in sorted(list(registry), reverse=True)]
    else:  # pragma: no cover - a newer distributed without them: the public way
        try:
            clients.append(dask_client.default_client())
        except ValueError:
            pass
    return [client for client in clients if client is not None]


def shorten_client_stream(client: Any, interval: float) -> None:
    """Have ``client`` batch its messages to the scheduler every
    ``interval`` seconds at most (Dask's default: 10 ms)."""
    _shorten(getattr(client, "scheduler_comm", None), interval)


@functools.cache
def _graph_takes_expr() -> bool:
    from distributed import Client

    if not hasattr(Client, "_graph_to_futures"):
        raise _missing("Client._graph_to_futures")
    # (self, dsk, ...) before 2025.4; (self, expr, ...) since.
    return list(inspect.signature(Client._graph_to_futures).parameters)[1] == "expr"


def submit_data_producers(client: Any, func: Any, tasks: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
    """Submit ``func(*args)`` for each ``(key, args)`` in one graph, as
    data-producing tasks the scheduler queues, in this order (see
    ``_tasks.submit_queued``); their Dask futures, in the same order."""
    try:
        from dask._task_spec import Task
        from distributed.spans import SpanMetadata
    except ImportError as error:
        raise _missing(f"dask._task_spec.Task or distributed.spans.SpanMetadata ({error})") from None
    graph: dict[str, Any] = {key: Task(key, func, *args, _data_producer=True) for key, args in tasks}
    if _graph_takes_expr():
        try:
            from dask._expr import LLGExpr
        except ImportError as error:
            raise _missing(f"dask._expr.LLGExpr ({error})") from None
        submitted: Any = LLGExpr(graph, _determ_token=_token())
    else:
        submitted = graph
    futures = client._graph_to_futures(
        submitted,
        list(graph),
        internal_priority={key: order for order, key in enumerate(graph)},
        fifo_timeout=0,
        span_metadata=SpanMetadata(collections=[{"type": "Future"}]),
    )
    return [futures[key] for key in graph]


def _token() -> str:
    import uuid

    return uuid.uuid4().hex


# -- the scheduler --------------------------------------------------------------


def _shorten(stream: Any, interval: float) -> None:
    """Set a ``BatchedSend``'s interval to ``interval`` if it is longer."""
    if stream is not None and getattr(stream, "interval", 0) > interval:
        stream.interval = interval


def shorten_worker_stream_on_scheduler(scheduler: Any, worker: str, interval: float) -> None:
    """Have the scheduler batch its messages to ``worker`` every ``interval`` s."""
    _shorten(scheduler.stream_comms.get(worker), interval)


def shorten_client_stream_on_scheduler(scheduler: Any, client: str, interval: float) -> None:
    """Have the scheduler batch its messages to ``client`` every ``interval`` s."""
    _shorten(scheduler.client_comms.get(client), interval)


def send_to_worker(scheduler: Any, worker: str, message: dict[str, Any]) -> bool:
    """Send ``message`` on the scheduler's stream to ``worker``; ``False``
    if that worker is gone."""
    stream = scheduler.stream_comms.get(worker)
    if stream is None:
        return False
    stream.send(message)
    return True


def add_stream_handler(server: Any, op: str, handler: Callable[..., Any]) -> None:
    """Have a scheduler or a worker pass the messages ``{"op": op, ...}``
    that arrive on its streams to ``handler(**message)``."""
    handlers = getattr(server, "stream_handlers", None)
    if not isinstance(handlers, dict):
        raise _missing(f"{type(server).__name__}.stream_handlers")
    handlers[op] = handler


def has_stream_handler(server: Any, op: str) -> bool:
    handlers = getattr(server, "stream_handlers", None)
    return isinstance(handlers, dict) and op in handlers


def wrap_handler(server: Any, op: str, wrap: Callable[[Any], Any]) -> None:
    """Replace a scheduler's (or worker's) RPC handler ``op`` by
    ``wrap(original)``."""
    handlers = getattr(server, "handlers", None)
    if not isinstance(handlers, dict) or op not in handlers:
        raise _missing(f"{type(server).__name__}.handlers[{op!r}]")
    handlers[op] = wrap(handlers[op])


def scheduler_task_states(scheduler: Any, keys: Iterable[str]) -> dict[str, tuple[str, str | None]]:
    """Of these tasks, those the scheduler knows: ``key -> (state, address
    of the worker it is processing on, or None)``."""
    tasks = scheduler.tasks
    states = {}
    for key in keys:
        task = tasks.get(key)
        if task is not None:
            worker = task.processing_on
            states[key] = (task.state, worker.address if worker is not None else None)
    return states


# -- the workers ------------------------------------------------------------------


def shorten_worker_stream(worker: Any, interval: float) -> None:
    """Have ``worker`` batch its messages to the scheduler every
    ``interval`` seconds at most (Dask's default: 2 ms)."""
    _shorten(getattr(worker, "batched_stream", None), interval)


def send_to_scheduler(worker: Any, message: dict[str, Any]) -> None:
    """Send ``message`` on ``worker``'s stream to the scheduler."""
    worker.batched_stream.send(message)


def worker_running_keys(worker: Any) -> set[str]:
    """The keys of the tasks ``worker`` is running now."""
    state = worker.state
    return {task.key for task in (*state.executing, *state.long_running)}


def set_current_worker(worker: Any) -> bool:
    """Make ``worker`` what ``distributed.get_worker()`` returns in this
    context; ``False`` if ``distributed.worker`` is not imported yet."""
    import sys

    worker_module = sys.modules.get("distributed.worker")
    if worker_module is None:
        return False
    cvar = getattr(worker_module, "_worker_cvar", None)
    if cvar is None:
        raise _missing("distributed.worker._worker_cvar")
    cvar.set(worker)
    return True


def keep_signals_out_of_gc() -> None:
    """Make Dask's GC diagnosis (a Python callback in ``gc.callbacks``, put
    there by every scheduler and worker of the process) run no Python code.

    A signal's Python handler runs at whatever Python code comes next, and
    code run by the garbage collector cannot raise: a Ctrl-C whose
    ``KeyboardInterrupt`` was raised there was printed ("Exception ignored
    in ... _gc_callback") and lost, and the script waited in
    ``future.result()`` for ever (about 1 run in 4 of the Ctrl-C test).
    The diagnosis only logs slow collections, which the executor silences.
    The callback becomes a C function that does nothing, under Dask's own
    bookkeeping, so Dask's enable/disable still pair up.
    """
    import gc
    import operator

    from distributed import gc as dask_gc

    diagnosis = getattr(dask_gc, "_gc_diagnosis", None)
    lock = getattr(dask_gc, "_gc_diagnosis_lock", None)
    if diagnosis is None or lock is None:
        return
    with lock:
        callback = diagnosis._gc_callback
        if callback is operator.is_:
            return
        # Called as callback(phase, info): operator.is_ takes any two
        # arguments, runs no Python code, and cannot fail.
        if callback in gc.callbacks:
            gc.callbacks[gc.callbacks.index(callback)] = operator.is_
        diagnosis._gc_callback = operator.is_


def start_offload_thread() -> None:
    """Have Dask's offload thread (``distributed.utils._offload_executor``,
    one per process, where every event loop deserializes large messages)
    start now, in the calling thread, if it has not started yet.

    A thread inherits its signal mask from the thread that starts it, and
    this one starts on the first large message any event loop of the
    process receives: a loop the executor did not start (a ``LocalCluster``
    of the caller's, its scheduler then in this process) would make it take
    Ctrl-C (see ``_signals``). Called while the executor's threads start,
    it begins with theirs."""
    from distributed import utils

    executor = getattr(utils, "_offload_executor", None)
    if executor is None:
        return
    executor.submit(int).result(timeout=10)
