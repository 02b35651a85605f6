"""``launch='srun'``: a plain ``python script.py`` inside a SLURM allocation.

The scheduler runs in this process (as in the local mode); the workers are
one background ``srun`` step over the whole allocation, one task per node
(``python -m sulis_executor._node``) with all of the node's CPUs, which
imports Dask once and forks the node's agent, a Dask worker, and the member
processes that run the calls, ``nthreads`` (by default its CPUs) per SLURM
task of the node (see ``_agent``,
``_pool`` and ``_node``). No task is set aside for the scheduler or the
script: they are light, and run next to the first node's members.

The step is started with ``--overlap`` so that it can share the allocation
with the batch step and with any ``srun`` the user's own script runs later,
and with ``--kill-on-bad-exit=0`` so that one worker dying (e.g. a task that
segfaults) does not take the others down with it, and ``--no-kill`` so that
neither does a node SLURM declares failed (in a job submitted with
``--no-kill``; otherwise SLURM ends the whole job). The ``srun`` process
itself, its input and output and ending it, is ``_srun_step.SrunStep``'s.

SIGTERM (``scancel``, the job reaching its time limit, ``timeout``, ``kill``)
would end the script at once by default, skipping ``finally`` blocks, the
``with`` block's shutdown and the executor's own cleanup, and leaving the
workers to notice on their own that the scheduler vanished. So while an
executor is open, a SIGTERM that would otherwise kill the script raises
``SystemExit(143)`` in the main thread instead (only if no handler was set,
and only when the executor is created in the main thread): the script
unwinds, the executor shuts down and ends the worker step, and the exit
status is the usual 128 + 15. A second SIGTERM kills at once, as before.
A watchdog bounds that unwinding: if the executor has not shut down within
``SIGTERM_GRACE`` seconds (or ``SIGTERM_GRACE_NO_STEP`` once the worker step
has ended, as it does when the whole job is cancelled, so that nothing waits
for workers that are gone), the step is cancelled and the process exits.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from typing import Any

from .._signals import leave_signals_to_main_thread
from ..config import ExecutorOptions
from ..errors import ClusterStartupTimeout
from ..slurm import SlurmAllocation
from ._network import require_reachable, scheduler_host
from ._resources import worker_flags, worker_threads
from ._srun_step import SrunStep
from .base import Cluster, Launcher

logger = logging.getLogger("sulis_executor")


def min_workers_for(wait_for_workers: float | int | None, expected: int) -> int:
    """How many of ``expected`` workers to wait for: all by default, a count
    (at most ``expected``), or a fraction of them rounded up."""
    if wait_for_workers is None:
        return expected
    if isinstance(wait_for_workers, float):
        return max(1, math.ceil(wait_for_workers * expected))
    return min(int(wait_for_workers), expected)


def node_cpus(allocation: SlurmAllocation) -> int:
    """CPUs to give each node's task: the node's share of the allocation
    (all its tasks' CPUs), the smallest node's when nodes differ."""
    return min(tasks * allocation.cpus_per_task for tasks in allocation.tasks_per_node)


def srun_command(
    allocation: SlurmAllocation, step_name: str, node_argv: list[str]
) -> list[str]:
    """The ``srun`` command line that runs ``node_argv`` once per node."""
    return [
        "srun",
        f"--job-name={step_name}",
        f"--nodes={len(allocation.nodes)}",
        f"--ntasks={len(allocation.nodes)}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={node_cpus(allocation)}",
        # Share the allocation with the batch step and later user steps
        # instead of waiting for CPUs/memory they hold.
        "--overlap",
        # One dead worker must not end the others; the executor copes.
        "--kill-on-bad-exit=0",
        # Nor one lost node (in a job submitted with --no-kill; otherwise
        # SLURM ends the whole job): SLURM would end every task of the step.
        "--no-kill",
        "--export=ALL",
        # What we write to srun's standard input reaches every task's: the
        # scheduler's address and the job's secrets (see SrunLauncher.start).
        "--input=all",
        *node_argv,
    ]


#: After a SIGTERM, the script has this long to unwind and shut its
#: executors down before the step is cancelled and the process exits (SLURM's
#: default KillWait, between its SIGTERM and SIGKILL, is 30 s).
SIGTERM_GRACE = 20.0
#: ... or this long while an open executor's worker step has already ended
#: (scancel and the time limit end it too): its pending work can never
#: finish, so waiting for it would only hang.
SIGTERM_GRACE_NO_STEP = 3.0

#: Launchers started and not yet closed, for the SIGTERM watchdog.
_open_launchers: weakref.WeakSet[SrunLauncher] = weakref.WeakSet()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM while an executor is open: unwind (``finally``, ``with``,
    atexit) so the executor shuts the workers down, then exit 128 + 15."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one kills at once
    try:
        print("sulis_executor: SIGTERM received (scancel or time limit?); shutting down "
              "the executor", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
    with leave_signals_to_main_thread():
        threading.Thread(target=_sigterm_watchdog, args=(128 + signum,), daemon=True,
                         name="sulis-executor-sigterm-watchdog").start()
    raise SystemExit(128 + signum)


def _sigterm_watchdog(status: int) -> None:
    """Bound the unwinding a SIGTERM started: the process must not outlive
    its job waiting for workers that are gone."""
    started = time.monotonic()
    while True:
        launchers = [launcher for launcher in list(_open_launchers) if not launcher._closed]
        if not launchers:
            return  # every executor shut down: the script ends as it wishes
        elapsed = time.monotonic() - started
        step_gone = any(launcher._step.ended() for launcher in launchers)
        if elapsed > SIGTERM_GRACE or (step_gone and elapsed > SIGTERM_GRACE_NO_STEP):
            break
        time.sleep(0.1)
    for launcher in launchers:
        try:
            launcher._step.force_stop()
        except Exception:
            pass
    try:
        print(f"sulis_executor: the executor did not shut down within {time.monotonic() - started:.0f} s "
              "of SIGTERM (its workers are gone); exiting", file=sys.stderr, flush=True)
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    os._exit(status)


class SrunLauncher(Launcher):
    name = "srun"

    def __init__(self, options: ExecutorOptions, security: object = None,
                 environ: Mapping[str, str] | None = None) -> None:
        self._options = options
        self._security = security
        self._environ = os.environ if environ is None else environ
        allocation = SlurmAllocation.from_environ(self._environ)
        if allocation is None:
            raise RuntimeError(
                "launch='srun' needs a SLURM allocation, but SLURM_JOB_ID is not set; "
                "run the script inside sbatch or salloc, or use launch='local'"
            )
        if shutil.which("srun") is None:
            raise RuntimeError(
                f"launch='srun': SLURM job {allocation.job_id} found but no 'srun' command "
                "on PATH; load the SLURM module, or use launch='local'"
            )
        self.allocation = allocation
        # Each SLURM task's CPUs run calls at once, each in a member process of
        # its own (as ProcessPoolExecutor runs a process per CPU): the Sulis
        # page's --ntasks-per-node=1 --cpus-per-task=128 gets 128, not 1.
        # nthreads=1 runs one call per task, with all its CPUs (BLAS, OpenMP).
        self._calls_per_task = worker_threads(options, allocation)
        # A unique step name lets close() find the step to scancel it, and
        # lets tests find stray processes.
        self.step_name = f"sulis-workers-{uuid.uuid4().hex[:8]}"
        self._step = SrunStep(allocation.job_id, self.step_name)
        self._cluster: Any = None
        self._closed = False
        self._sigterm_installed = False

    # -- SIGTERM ----------------------------------------------------------

    def _install_sigterm_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
                return  # the user's (or another executor's) handler stays
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        except (ValueError, OSError):
            return
        self._sigterm_installed = True

    def _remove_sigterm_handler(self) -> None:
        if not self._sigterm_installed:
            return
        if threading.current_thread() is not threading.main_thread():
            return  # harmless: the handler only makes a SIGTERM exit unwind first
        self._sigterm_installed = False
        try:
            if signal.getsignal(signal.SIGTERM) is _exit_on_sigterm:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
        except (ValueError, OSError):
            pass

    # -- start ------------------------------------------------------------

    def _node_argv(self) -> list[str]:
        argv = [
            # "-": the scheduler's address, and the secrets, on standard input.
            sys.executable, "-m", "sulis_executor._node", "-",
            "--name", "srun-{node}",
            # Without the scheduler, a worker gives up after this long
            # rather than lingering in the allocation.
            "--death-timeout", str(max(60.0, self._options.timeout)),
            *worker_flags(self._options, self.allocation),
            "--members-per-node", ",".join(str(tasks * self._calls_per_task)
                                           for tasks in self.allocation.tasks_per_node),
        ]
        if self._options.max_tasks_per_child is not None:
            argv += ["--max-tasks", str(self._options.max_tasks_per_child)]
        return argv

    def start(self, timeout: float) -> Cluster:
        from .._security import resolve_security
        from ._scheduler import start_scheduler

        deadline = time.monotonic() + timeout
        options = self._options
        # A bad interface fails before any step: an unknown one, or loopback
        # when workers run on other nodes.
        host = scheduler_host(options.interface)
        require_reachable(host, options.interface, self.allocation.nodes)
        self._install_sigterm_handler()
        _open_launchers.add(self)
        # Workers first: launching the step and importing Dask on every node
        # is most of the start-up time, so it happens while the scheduler
        # starts; the nodes then read its address from their standard input.
        command = srun_command(self.allocation, self.step_name, self._node_argv())
        if len(set(self.allocation.tasks_per_node)) > 1:
            logger.warning("the nodes of this allocation have %s tasks: each node's task gets "
                           "%d CPUs, the smallest node's", "/".join(map(str, self.allocation.tasks_per_node)),
                           node_cpus(self.allocation))
        logger.info("starting %d workers on %d nodes: %s", self.allocation.ntasks * self._calls_per_task,
                    len(self.allocation.nodes), " ".join(command))
        self._step.start(command)
        try:
            # The credentials, made while the workers start (see DeferredSecurity).
            self._security = resolve_security(self._security)
            self._cluster = start_scheduler(options, self._security, host)
            self._greet(self._cluster.scheduler_address)
        finally:
            # Sent, or given up: the nodes read the end of their input
            # (they exit at once if nothing came before it).
            self._step.end_input()
        nodes = len(self.allocation.nodes)
        members = min_workers_for(options.wait_for_workers, self.allocation.ntasks * self._calls_per_task)
        # Every node's agent, but those only a fraction of workers need.
        agents = min(nodes, members)
        self._wait_for_workers(agents, deadline)
        return Cluster(
            target=self._cluster,
            security=self._security,
            expected_workers=nodes,
            min_workers=agents,
            expected_members=members,
            description=self.description,
            workers_reachable=True,
        )

    def _greet(self, address: str) -> None:
        """Tell every worker the scheduler's address and the job's secrets:
        the TLS credentials, and multiprocessing's key for Manager proxies.

        They go through srun's standard input (``--input=all``), which SLURM
        forwards to each of our tasks' standard input: a channel that leaves
        no copy behind, unlike the step's environment (``/proc/PID/environ``
        of srun and of every worker, for their whole life, and SLURM's launch
        message), or a file (on a shared file system: every node must read it).
        """
        from .._security import credentials_of, process_authkey

        greeting: dict[str, Any] = {"scheduler": address, "authkey": process_authkey()}
        if self._security is not None:
            greeting["credentials"] = credentials_of(self._security)
        self._step.write_input(json.dumps(greeting).encode() + b"\n")

    @property
    def description(self) -> str:
        a = self.allocation
        return (f"SLURM job {a.job_id}: srun step {self.step_name!r} of {a.ntasks * self._calls_per_task} "
                f"worker processes on {len(a.nodes)} nodes")

    def dashboard_link(self) -> str | None:
        if self._cluster is None or not self._options.dashboard:
            return None
        link: str = self._cluster.dashboard_link
        return link

    def _worker_count(self) -> int:
        assert self._cluster is not None
        # Read the in-process scheduler directly: no round trip needed.
        return len(self._cluster.scheduler.workers)

    def _wait_for_workers(self, minimum: int, deadline: float) -> None:
        """Wait for ``minimum`` workers, failing fast if the step ends."""
        from .._versions import raise_if_refused

        while self._worker_count() < minimum:
            raise_if_refused(self._cluster.scheduler)
            returncode = self._step.returncode()
            if returncode is not None:
                raise RuntimeError(
                    f"the srun step that starts the workers ({self.step_name}) exited with "
                    f"status {returncode} after {self._worker_count()} of {minimum} workers "
                    f"connected; srun's stderr ends with:\n{self._step.stderr_tail()}"
                )
            if time.monotonic() > deadline:
                raise ClusterStartupTimeout(
                    f"only {self._worker_count()} of {minimum} workers of {self.description} "
                    f"connected within {self._options.timeout:g} s; check the job output for "
                    "worker errors, that nodes can reach the scheduler on the chosen interface "
                    "(interface=), or raise timeout=. srun's stderr so far:\n"
                    + self._step.stderr_so_far()
                )
            time.sleep(0.05)
        raise_if_refused(self._cluster.scheduler)

    # -- close ------------------------------------------------------------

    def signal_workers(self, signum: int) -> bool:
        """Signal the step's tasks (see ``SrunStep.signal``)."""
        self._step.signal(signum)
        return True

    def close(self, timeout: float) -> None:
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        # Closing the scheduler first tells every worker to close: they exit
        # 0 and srun ends on its own, quietly. Signalling srun instead makes
        # it abort the step and report every task as killed.
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            try:
                cluster.close(timeout=max(1.0, (deadline - time.monotonic()) / 2))
            except Exception:
                logger.debug("error closing the scheduler", exc_info=True)
        self._step.stop(deadline)
        self._remove_sigterm_handler()

    def workers_gone(self) -> bool:
        """True once the worker step has ended while the executor is open:
        srun mode never replaces workers, so pending work can never finish."""
        return not self._closed and self._step.ended()
