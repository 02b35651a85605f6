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
``--no-kill``; otherwise SLURM ends the whole job).

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

import collections
import json
import logging
import math
import os
import shutil
import signal
import subprocess
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
from ._processes import SIGNALLED_GRACE, pythonpath_env
from ._resources import worker_flags, worker_threads
from .base import Cluster, Launcher

logger = logging.getLogger("sulis_executor")

#: Lines of the step's stderr kept for error messages.
STDERR_TAIL = 30


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
        step_gone = any(launcher._step_ended() for launcher in launchers)
        if elapsed > SIGTERM_GRACE or (step_gone and elapsed > SIGTERM_GRACE_NO_STEP):
            break
        time.sleep(0.1)
    for launcher in launchers:
        try:
            launcher._force_stop()
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
        self._cluster: Any = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self._stderr_thread: threading.Thread | None = None
        self._closed = False
        self._sigterm_installed = False
        # Set once we signal the workers ourselves (terminate_workers):
        # srun's reports of the tasks it kills are then no news.
        self._signalled = False

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
        self._proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=pythonpath_env(),
            # Its own process group: a Ctrl-C meant for the script reaches
            # srun only through close(), not twice.
            start_new_session=True,
        )
        self._stderr_thread = threading.Thread(
            target=self._pump_stderr, name="sulis-executor-srun-stderr", daemon=True
        )
        with leave_signals_to_main_thread():
            self._stderr_thread.start()
        try:
            # The credentials, made while the workers start (see DeferredSecurity).
            self._security = resolve_security(self._security)
            self._cluster = start_scheduler(options, self._security, host)
            self._greet(self._cluster.scheduler_address)
        finally:
            # Sent, or given up: the nodes read the end of their input
            # (they exit at once if nothing came before it).
            self._end_input()
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
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(greeting).encode() + b"\n")
            self._proc.stdin.flush()
        except OSError:
            pass  # srun has exited: _wait_for_workers says why

    def _end_input(self) -> None:
        proc = self._proc
        if proc is not None and proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass

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

    def _pump_stderr(self) -> None:
        # Pass srun's (and the workers') stderr through, keeping the tail
        # for the error raised if the step ends early.
        assert self._proc is not None and self._proc.stderr is not None
        for raw in iter(self._proc.stderr.readline, b""):
            line = raw.decode(errors="replace")
            self._stderr_tail.append(line.rstrip("\n"))
            if self._signalled and line.startswith("srun: "):
                continue
            try:
                sys.stderr.write(line)
            except (OSError, ValueError):
                pass

    def stderr_tail(self) -> str:
        if self._stderr_thread is not None:
            self._stderr_thread.join(2.0)
        return "\n".join(self._stderr_tail) or "(no output on stderr)"

    def _worker_count(self) -> int:
        assert self._cluster is not None
        # Read the in-process scheduler directly: no round trip needed.
        return len(self._cluster.scheduler.workers)

    def _wait_for_workers(self, minimum: int, deadline: float) -> None:
        """Wait for ``minimum`` workers, failing fast if the step ends."""
        from .._versions import raise_if_refused

        assert self._proc is not None
        while self._worker_count() < minimum:
            raise_if_refused(self._cluster.scheduler)
            returncode = self._proc.poll()
            if returncode is not None:
                raise RuntimeError(
                    f"the srun step that starts the workers ({self.step_name}) exited with "
                    f"status {returncode} after {self._worker_count()} of {minimum} workers "
                    f"connected; srun's stderr ends with:\n{self.stderr_tail()}"
                )
            if time.monotonic() > deadline:
                raise ClusterStartupTimeout(
                    f"only {self._worker_count()} of {minimum} workers of {self.description} "
                    f"connected within {self._options.timeout:g} s; check the job output for "
                    "worker errors, that nodes can reach the scheduler on the chosen interface "
                    "(interface=), or raise timeout=. srun's stderr so far:\n"
                    + ("\n".join(self._stderr_tail) or "(nothing)")
                )
            time.sleep(0.05)
        raise_if_refused(self._cluster.scheduler)

    # -- close ------------------------------------------------------------

    def signal_workers(self, signum: int) -> bool:
        """Signal the step's tasks through SLURM (``scancel --signal``); if
        the step cannot be found, signal srun, which passes a SIGTERM on to
        them and, killed itself, has SLURM end the step."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return True
        self._signalled = True
        if not self._scancel("--quiet", f"--signal={signal.Signals(signum).name[3:]}"):
            proc.send_signal(signum)
        return True

    def _scancel(self, *flags: str) -> list[str]:
        """Run ``scancel`` with ``flags`` on our step; return the step ids
        found (none if squeue did not answer)."""
        steps = self._step_ids()
        for step in steps:
            try:
                subprocess.run(["scancel", *flags, step], capture_output=True, timeout=10, check=False)
            except (OSError, subprocess.TimeoutExpired):
                pass
        return steps

    def _step_ids(self) -> list[str]:
        """``jobid.stepid`` of our step, found by its unique name."""
        try:
            out = subprocess.run(
                ["squeue", "-h", "-s", "-j", self.allocation.job_id, "-o", "%i %j"],
                capture_output=True, text=True, timeout=10, check=False,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return []
        return [line.split()[0] for line in out.splitlines()
                if len(line.split()) == 2 and line.split()[1] == self.step_name]

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
        proc, self._proc = self._proc, None
        if proc is not None:
            self._stop_step(proc, deadline)
        if self._stderr_thread is not None:
            self._stderr_thread.join(max(0.1, deadline - time.monotonic()))
        self._remove_sigterm_handler()

    def _step_ended(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is not None

    def workers_gone(self) -> bool:
        """True once the worker step has ended while the executor is open:
        srun mode never replaces workers, so pending work can never finish."""
        return not self._closed and self._step_ended()

    def _force_stop(self) -> None:
        """Cancel the step at once (the SIGTERM watchdog's last resort)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        for step in self._step_ids():
            subprocess.run(["scancel", step], capture_output=True, timeout=5, check=False)
        try:
            proc.wait(3.0)
        except subprocess.TimeoutExpired:
            proc.kill()

    def _stop_step(self, proc: subprocess.Popen[bytes], deadline: float) -> None:
        """Wait for the step to end; past a share of the deadline, cancel it."""
        graceful = max(1.0, (deadline - time.monotonic()) * 0.6)
        if self._signalled:  # terminate_workers(): a worker mid-call gets no longer
            graceful = SIGNALLED_GRACE
        try:
            proc.wait(graceful)
            return
        except subprocess.TimeoutExpired:
            pass
        # Signalled already: SIGKILL now, not SLURM's SIGTERM, KillWait, SIGKILL.
        steps = self._scancel(*(["--signal=KILL"] if self._signalled else []))
        if not self._signalled:
            logger.warning("workers of %s did not stop within %.1f s; cancelled step %s",
                           self.step_name, graceful, ", ".join(steps) or "(not found)")
        if not steps and proc.poll() is None:
            # No squeue answer: srun aborts the step itself on SIGTERM.
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
