"""Worker process entry point: ``python -m sulis_executor.worker SCHEDULER``.

The local and ``srun`` launch modes start workers with this command rather
than through :mod:`multiprocessing`. A spawned multiprocessing child
re-imports the user's ``__main__``, so a plain script without an
``if __name__ == "__main__":`` guard, which works with ``ProcessPoolExecutor``
on Linux, would start clusters recursively. A fresh interpreter running this
module never touches the user's script.

The process ends when the scheduler goes away or it is told to close, and, on
Linux, when its parent dies (``PR_SET_PDEATHSIG``), so that a killed client
never leaves workers behind on a shared node.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except Exception:  # best effort: the scheduler's death also ends us
        pass


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sulis_executor.worker",
        description="Run one Dask worker for a SulisDaskExecutor cluster.",
    )
    parser.add_argument("scheduler", help="scheduler address, e.g. tls://10.0.0.1:40123")
    parser.add_argument("--name", default=None, help="worker name shown by the scheduler")
    parser.add_argument("--nthreads", type=int, default=1)
    parser.add_argument("--memory-limit", default="auto")
    parser.add_argument("--host", default=None, help="address to bind, e.g. 127.0.0.1")
    parser.add_argument("--interface", default=None, help="network interface to bind, e.g. ib0")
    parser.add_argument("--local-directory", default=None)
    parser.add_argument("--death-timeout", type=float, default=60.0,
                        help="seconds to keep trying to reach the scheduler before giving up")
    parser.add_argument("--verbose", action="store_true", help="let Dask's logs through")
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace) -> None:
    from distributed import Worker

    from distributed.utils import get_ip_interface

    # The worker's HTTP endpoint (/health, metrics) listens only where its
    # comms do, on a random port, never on every interface.
    http_host = args.host or (get_ip_interface(args.interface) if args.interface else "127.0.0.1")
    memory_limit: str | int = args.memory_limit
    if memory_limit.isdigit():
        memory_limit = int(memory_limit)
    worker = Worker(
        args.scheduler,
        name=args.name,
        nthreads=args.nthreads,
        memory_limit=memory_limit,
        host=args.host,
        interface=args.interface,
        local_directory=args.local_directory,
        dashboard=False,
        dashboard_address=f"{http_host}:0",
        death_timeout=args.death_timeout,
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(
            signum, lambda: asyncio.ensure_future(worker.close(reason="signal", nanny=False))
        )
    await worker
    await worker.finished()


def main(argv: list[str] | None = None) -> int:
    _die_with_parent()
    args = _parse(argv)
    if not args.verbose:
        from ._quiet import silence_dask_logs

        silence_dask_logs(verbose=False)
    # Workers never print tracebacks of their own on the way out: a closed
    # scheduler is the normal way for them to end.
    try:
        asyncio.run(_run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    except Exception as error:
        if args.verbose:
            raise
        logging.getLogger("sulis_executor").debug("worker ended: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
