"""Worker process entry point: ``python -m sulis_executor.worker SCHEDULER``.

The ``srun`` launch mode starts workers with this command rather than
through :mod:`multiprocessing`, and so does the local mode where it has no
fork server (which runs :func:`main` in workers it forks; see
:mod:`sulis_executor._forkserver`). A spawned multiprocessing child
re-imports the user's ``__main__``, so a plain script without an
``if __name__ == "__main__":`` guard, which works with ``ProcessPoolExecutor``
on Linux, would start clusters recursively. A fresh interpreter running this
module (or a fork of the fork server, itself one) never touches the user's
script.

``--name`` may be a template expanded from this task's environment, so one
command line started by ``srun`` over many tasks gives each worker its own
name: ``{procid}`` (``SLURM_PROCID``, else the MPI rank from ``PMI_RANK`` /
``OMPI_COMM_WORLD_RANK``), ``{localid}``, ``{nodeid}``, ``{node}``
(``SLURMD_NODENAME``, else the host name) and ``{jobid}``, ``{stepid}``.

The process ends when the scheduler goes away or it is told to close, and, on
Linux, when its parent dies (``PR_SET_PDEATHSIG``), so that a killed client
never leaves workers behind on a shared node. A worker's parent is the client,
or, in local mode on Linux, the client's fork server
(:mod:`sulis_executor._forkserver`), which runs :func:`main` in each child it
forks; such a worker also knows the client, to tell the fork server's death
(exit: the client starts a new worker) from the client's (exit, and remove the
client's private files first, as the fork server does).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from typing import Any


def _die_with_parent(signum: int = signal.SIGTERM, parent: int | None = None) -> bool:
    """Ask for ``signum`` when our parent dies (Linux's ``PR_SET_PDEATHSIG``).

    Returns whether ``parent``, if given, is still our parent. If it died
    before we asked, the signal will never come, and the caller should go.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signum)
        except Exception:  # best effort: the scheduler's death also ends us
            pass
    return parent is None or os.getppid() == parent


#: A process as ``(pid, start time)``: unlike a pid alone, never another
#: process's after the first one exits.
ProcessIdentity = tuple[int, str]


def process_start_time(pid: int) -> str | None:
    """``pid``'s start time (in clock ticks since boot, from ``/proc``), or
    ``None`` if no such process is running (a zombie has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name, in parentheses, may hold spaces: split after it.
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return None
    state, start = fields[0], fields[19]  # fields 3 and 22 of proc(5)
    return None if state in "ZXx" else start


@dataclasses.dataclass(frozen=True)
class Parentage:
    """Who started this worker, to tell when they are gone.

    ``parent`` is our parent's pid at start (after ``PR_SET_PDEATHSIG``, so
    its death cannot be missed). ``client`` is the client's identity when the
    parent is not the client but its fork server; without it the parent is
    the client.
    """

    parent: int
    client: ProcessIdentity | None = None

    def parent_gone(self) -> bool:
        return bool(self.parent) and os.getppid() != self.parent

    def client_gone(self) -> bool:
        if self.client is None:
            return self.parent_gone()
        pid, start = self.client
        return process_start_time(pid) != start


def _first(environ: Mapping[str, str], *names: str) -> str | None:
    return next((environ[n] for n in names if environ.get(n)), None)


def expand_name(template: str | None, environ: Mapping[str, str]) -> str | None:
    """Expand ``{procid}``-style fields of a worker name from ``environ``.

    Names without braces are returned unchanged. A field whose variable is not
    set raises ``ValueError`` saying which variables were looked for.
    """
    if template is None or "{" not in template:
        return template
    fields = {
        "procid": ("SLURM_PROCID", "PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK"),
        "rank": ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"),
        "localid": ("SLURM_LOCALID", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK"),
        "nodeid": ("SLURM_NODEID",),
        "jobid": ("SLURM_JOB_ID", "SLURM_JOBID"),
        "stepid": ("SLURM_STEP_ID", "SLURM_STEPID"),
        "node": ("SLURMD_NODENAME",),
    }
    values = {key: _first(environ, *names) for key, names in fields.items()}
    values["node"] = values["node"] or socket.gethostname()
    values["pid"] = str(os.getpid())

    class _Fields(dict):  # type: ignore[type-arg]
        def __missing__(self, key: str) -> str:
            names = fields.get(key)
            if names is None:
                raise ValueError(
                    f"worker name template {template!r} uses {{{key}}}, which is not a "
                    f"known field; known fields: {', '.join(sorted(values))}"
                )
            raise ValueError(
                f"worker name template {template!r} uses {{{key}}}, but none of "
                f"{', '.join(names)} is set in this process's environment"
            )

    present = _Fields({k: v for k, v in values.items() if v is not None})
    return template.format_map(present)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sulis_executor.worker",
        description="Run one Dask worker for a SulisDaskExecutor cluster.",
    )
    parser.add_argument("scheduler", help="scheduler address, e.g. tls://10.0.0.1:40123; '-' to "
                        "import Dask first, then read the address from standard input (a JSON "
                        "line with 'scheduler' and, optionally, the TLS credentials as "
                        "'credentials' (key and cert) or 'security_file', and 'authkey')")
    parser.add_argument("--name", default=None,
                        help="worker name shown by the scheduler; may use {procid}, {localid}, "
                             "{nodeid}, {node}, {jobid}, {stepid}, {rank}, {pid}")
    parser.add_argument("--nthreads", type=int, default=1)
    parser.add_argument("--memory-limit", default="auto")
    parser.add_argument("--host", default=None, help="address to bind, e.g. 127.0.0.1")
    parser.add_argument("--interface", default=None, help="network interface to bind, e.g. ib0")
    parser.add_argument("--local-directory", default=None)
    parser.add_argument("--death-timeout", type=float, default=60.0,
                        help="seconds to keep trying to reach the scheduler before giving up")
    parser.add_argument("--security-file", default=None,
                        help="the job's TLS credentials (a mode-0600 file written by the executor)")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="the launcher's pid: exit at once if it is no longer our parent")
    parser.add_argument("--pool", type=int, default=0, metavar="N",
                        help="be a node's agent: a worker of N threads whose tasks, and the "
                             "executor's batches, run in the N members of the node's pool, which "
                             "connect to --pool-socket (see sulis_executor._agent)")
    parser.add_argument("--pool-socket", default=None, metavar="PATH",
                        help="the pool's Unix socket, in a private directory")
    parser.add_argument("--member", default=None, metavar="PATH",
                        help="be a member of the pool whose agent listens at PATH, not a worker")
    parser.add_argument("--engine", default="", help="the executor's token")
    parser.add_argument("--max-tasks", type=int, default=None,
                        help="a member leaves after this many tasks (max_tasks_per_child)")
    parser.add_argument("--verbose", action="store_true", help="let Dask's logs through")
    parser.add_argument("--profile", action="store_true",
                        help="the dashboard is on: run Dask's statistical profiler (its Profile "
                             "page) and serve Dask's HTTP routes, not /health alone")
    parser.set_defaults(credentials=None)  # only ever from the greeting (see _read_greeting)
    return parser.parse_args(argv)


#: Seconds between the batched sends of a worker's messages to the scheduler.
STREAM_INTERVAL = 0.001


def quiet_worker_config(profile: bool) -> dict[str, Any]:
    """Dask settings for a worker that is not being watched on a dashboard.

    Dask's statistical profiler samples every thread's stack every 10 ms and
    its event loop checks itself for stalls every 20 ms, in every worker:
    8 idle workers took 0.3 CPU-s per second that way, CPU that tasks and
    the scheduler wait for on a busy node. The profiler only feeds the
    dashboard's Profile page, and the stall check only feeds a log warning
    (silenced unless verbose); both stay on when asked for.
    """
    if profile:
        return {}
    from ._quiet import NO_STALL_CHECK

    return {"distributed.worker.profile.enabled": False, **NO_STALL_CHECK}


def http_config(dashboard: bool) -> dict[str, Any]:
    """What the worker's plain-HTTP server serves: ``/health`` alone, unless
    the dashboard is on (see ``launchers._network``)."""
    if dashboard:
        return {}
    from .launchers._network import HEALTH_ROUTES

    return {"distributed.worker.http.routes": list(HEALTH_ROUTES)}


def _read_greeting(args: argparse.Namespace) -> bool:
    """Read the scheduler address, and the job's secrets (the TLS
    credentials or the path of their file, multiprocessing's key), from the
    launcher's JSON line on standard input. ``False`` if the input ends
    first."""
    import json

    line = sys.stdin.readline()
    if not line.strip():
        return False
    greeting = json.loads(line)
    args.scheduler = greeting["scheduler"]
    args.security_file = greeting.get("security_file") or args.security_file
    # Inline (srun mode: no file every node could read); held in memory only.
    args.credentials = greeting.get("credentials")
    args.remove_when_orphaned = greeting.get("remove_when_orphaned") or []
    if greeting.get("authkey"):
        adopt_authkey(greeting["authkey"])
    return True


def adopt_authkey(hex_key: str) -> None:
    """Take the client's ``multiprocessing`` authentication key (hex).

    A ``multiprocessing.Manager`` proxy unpickled here authenticates to its
    manager with this process's key; ``ProcessPoolExecutor``'s workers
    inherit their parent's, so proxies passed to calls work. Ours are not
    the client's children, so the launcher sends the key.
    """
    import multiprocessing

    multiprocessing.current_process().authkey = bytes.fromhex(hex_key)


async def _run(args: argparse.Namespace, security: Any, parentage: Parentage) -> None:
    import dask.config
    from distributed import Worker

    from . import _dask_private
    from ._versions import worker_startup_information
    from .launchers._network import HTTP_HOST

    memory_limit: str | int = int(args.memory_limit) if args.memory_limit.isdigit() else args.memory_limit
    if security is None and (args.security_file or args.credentials):
        from ._security import read_credentials_file, security_from

        credentials = args.credentials or read_credentials_file(args.security_file)
        security = security_from(credentials)
    pool_options: dict[str, Any] = {}
    pool = agent = None
    if args.pool:
        from ._agent import POOL_EXECUTOR, Agent
        from ._pool import Pool, PoolExecutor

        # Listening before the worker starts: members connect while it does.
        pool = Pool(args.pool_socket, lambda event: agent.on_pool_event(event) if agent else None)
        pool.start()
        args.nthreads = args.pool  # Dask's task slots: the pool's members
        # The executor's own tasks (see _agent) run in the pool's members;
        # other Dask tasks in the agent's threads, as on any Dask worker.
        pool_options = {"executor": {POOL_EXECUTOR: PoolExecutor(pool)}}
    # The config holds while the worker starts (its HTTP routes are read then).
    with dask.config.set({**quiet_worker_config(args.profile or args.verbose),
                          **http_config(args.profile)}):
        worker = Worker(
            args.scheduler,
            security=security,
            name=args.name,
            nthreads=args.nthreads,
            memory_limit=memory_limit,
            host=args.host,
            interface=args.interface,
            local_directory=args.local_directory,
            dashboard=False,
            # Its plain-HTTP server: loopback, random port, whatever the
            # comms bind (see launchers._network).
            dashboard_address=f"{HTTP_HOST}:0",
            death_timeout=args.death_timeout,
            # Our version, which the scheduler checks (see _versions).
            startup_information=worker_startup_information(),
            **pool_options,
        )
        worker._sulis_pool = pool  # type: ignore[attr-defined]  # for _remote.InitializerPlugin.setup
        # Dask batches the worker's messages to the scheduler every 2 ms; a
        # finished task's report is most of what the executor waits on between
        # one batch and the next, so send after 1 ms (see launchers._scheduler).
        _dask_private.shorten_worker_stream(worker, STREAM_INTERVAL)
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            # (An MPI rank runs its node's agent in a thread: signals are its own.)
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, _on_signal, worker, args, parentage)
        try:
            await worker
        except BaseException:
            if pool is not None:
                pool.close()
            raise
    try:
        if pool is not None:
            agent = Agent(worker, pool)
            agent.start()
        await worker.finished()
    finally:
        if pool is not None:
            pool.close()  # the members hang up, and exit


def main(argv: list[str] | None = None, *, die_with_parent: bool = True,
         security: object = None, client: ProcessIdentity | None = None) -> int:
    """Run one worker until the scheduler closes or a signal; return the exit status.

    ``die_with_parent=False`` is for a worker run inside a process that has
    other duties (an MPI rank), whose parent is the MPI launcher anyway, and
    for a forked worker, which has set it already (see ``_forkserver``).
    ``security`` (a ``distributed.Security``) is for such in-process callers,
    which received the credentials by other means than a file. ``client`` is
    the client's identity when our parent is its fork server.
    """
    # Started by one of the client's threads, which leave signals to its
    # main thread (see _signals): take them, to close on SIGTERM.
    from ._signals import unblock_signals

    unblock_signals()
    args = _parse(argv)
    if die_with_parent and not _die_with_parent(parent=args.parent_pid):
        # Our launcher died before we asked to die with it: we would only
        # wait for its scheduler until --death-timeout.
        return 0
    parentage = Parentage(os.getppid(), client)
    try:
        args.name = expand_name(args.name, os.environ)
        if args.interface:
            # Fail with the list of interfaces this node has, not Dask's error.
            from .launchers._network import validate_interface

            validate_interface(args.interface)
    except ValueError as error:
        print(f"sulis_executor.worker: {error}", file=sys.stderr)
        return 2
    if args.member:
        # A member needs neither Dask nor the scheduler's address: only its
        # agent's socket, and the greeting's key and files.
        if args.scheduler == "-" and not _read_greeting(args):
            return 0
        from . import _pool

        def member_security() -> Any:
            if security is None and (args.credentials or args.security_file):
                from ._security import read_credentials_file, security_from

                return security_from(args.credentials or read_credentials_file(args.security_file))
            return security

        try:
            status = _pool.serve(args.member, args.engine, args.max_tasks,
                                 _pool.MemberWorker(args.scheduler, member_security))
        finally:
            _clean_up_if_orphaned(args, parentage)
        _pool.end_member_process(status)
    # Importing Dask (most of a worker's start-up time) sets up its loggers,
    # which are then silenced; a worker told to read its scheduler's address
    # does this while the scheduler starts.
    import distributed  # noqa: F401

    # What every task runs, imported now rather than at each worker's first
    # task: 8 new workers importing it at once on 2 cores started their
    # first calls up to 30 ms late.
    from . import _remote  # noqa: F401

    if not args.verbose:
        from ._quiet import silence_dask_logs

        silence_dask_logs(verbose=False)
    if args.scheduler == "-" and not _read_greeting(args):
        return 0  # the launcher gave up before the scheduler started
    # Workers never print tracebacks of their own on the way out: a closed
    # scheduler is the normal way for them to end.
    try:
        asyncio.run(_run(args, security, parentage))
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    except Exception as error:
        if args.verbose:
            raise
        # One line, no traceback: enough for a launcher's error message
        # (the srun mode shows the step's stderr tail) to say what went wrong.
        print(f"sulis_executor.worker {args.name or ''}: {_one_line(error)}",
              file=sys.stderr, flush=True)
        return 1
    finally:
        _clean_up_if_orphaned(args, parentage)
    return 0


def _one_line(error: BaseException) -> str:
    """``error`` and its causes: Dask's "Worker failed to start" says why
    only in its cause (e.g. the scheduler refused it: see ``_versions``)."""
    parts: list[str] = []
    seen: BaseException | None = error
    while seen is not None and len(parts) < 4:
        parts.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__
    return "; caused by ".join(parts)


def _on_signal(worker: Any, args: argparse.Namespace, parentage: Parentage) -> None:
    """SIGTERM or SIGINT: close, letting a running task finish, as a Dask
    worker does; but if our parent is gone (the signal is the parent-death
    signal), exit now: if the parent was the client, nobody will take the
    result, and the task may run for hours; if it was the fork server, the
    client counts us as dead and starts another worker in our place. If the
    client is gone, remove its files first."""
    if parentage.parent_gone():
        _clean_up_if_orphaned(args, parentage)
        os._exit(0)
    asyncio.ensure_future(worker.close(reason="signal", nanny=False))


def _clean_up_if_orphaned(args: argparse.Namespace, parentage: Parentage) -> None:
    """The client that started us died without removing its private files
    (credentials, shared buffers): remove them for it."""
    paths = getattr(args, "remove_when_orphaned", None)
    if paths and parentage.client_gone():
        import shutil

        for path in paths:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
