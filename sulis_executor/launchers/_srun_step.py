"""The ``srun`` step that runs the workers of ``launch='srun'``: its process.

:class:`SrunStep` owns the ``srun`` process from start to end: writing to
its standard input (which SLURM forwards to every task), passing its
standard error through while keeping the tail for error messages, telling
whether it has ended, signalling its tasks, and ending it, through SLURM
(``scancel``) when waiting is not enough.

Kept apart from ``SrunLauncher``, which decides what the step runs and
what the workers are told, and waits for them to join the scheduler: this
is only the process and SLURM's handle on it, found by the step's unique
name.
"""

from __future__ import annotations

import collections
import logging
import signal
import subprocess
import sys
import threading
import time

from .._signals import leave_signals_to_main_thread
from ._processes import SIGNALLED_GRACE, pythonpath_env

logger = logging.getLogger("sulis_executor")

#: Lines of the step's stderr kept for error messages.
STDERR_TAIL = 30


class SrunStep:
    """The step named ``name`` (unique: ``scancel`` finds it by that) in
    SLURM job ``job_id``."""

    def __init__(self, job_id: str, name: str) -> None:
        self.job_id = job_id
        self.name = name
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self._stderr_thread: threading.Thread | None = None
        # Set once we signal the workers ourselves (terminate_workers):
        # srun's reports of the tasks it kills are then no news.
        self._signalled = False

    def start(self, command: list[str]) -> None:
        """Run ``command`` (an ``srun`` command line), its standard error
        passed through."""
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

    # -- standard input and error ----------------------------------------------

    def write_input(self, data: bytes) -> None:
        """Write ``data`` to srun's standard input (every task's, with
        ``--input=all``)."""
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(data)
            self._proc.stdin.flush()
        except OSError:
            pass  # srun has exited: the launcher's wait for the workers says why

    def end_input(self) -> None:
        proc = self._proc
        if proc is not None and proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass

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

    def stderr_so_far(self) -> str:
        return "\n".join(self._stderr_tail) or "(nothing)"

    def stderr_tail(self) -> str:
        """The end of the step's stderr, once it has all been read."""
        if self._stderr_thread is not None:
            self._stderr_thread.join(2.0)
        return "\n".join(self._stderr_tail) or "(no output on stderr)"

    # -- its state -------------------------------------------------------------

    def returncode(self) -> int | None:
        """srun's exit status, or ``None`` while it runs (or was never started)."""
        return self._proc.poll() if self._proc is not None else None

    def ended(self) -> bool:
        """Whether the step ended on its own, before ``stop``."""
        return self.returncode() is not None

    # -- signalling and ending -------------------------------------------------

    def signal(self, signum: int) -> None:
        """Signal the step's tasks through SLURM (``scancel --signal``); if
        the step cannot be found, signal srun, which passes a SIGTERM on to
        them and, killed itself, has SLURM end the step."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self._signalled = True
        if not self._scancel("--quiet", f"--signal={signal.Signals(signum).name[3:]}"):
            proc.send_signal(signum)

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
                ["squeue", "-h", "-s", "-j", self.job_id, "-o", "%i %j"],
                capture_output=True, text=True, timeout=10, check=False,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return []
        return [line.split()[0] for line in out.splitlines()
                if len(line.split()) == 2 and line.split()[1] == self.name]

    def force_stop(self) -> None:
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

    def stop(self, deadline: float) -> None:
        """Wait for the step to end (its workers told to close), cancelling
        it past a share of the time left; then read the rest of its stderr."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._wait_or_cancel(proc, deadline)
        if self._stderr_thread is not None:
            self._stderr_thread.join(max(0.1, deadline - time.monotonic()))

    def _wait_or_cancel(self, proc: subprocess.Popen[bytes], deadline: float) -> None:
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
                           self.name, graceful, ", ".join(steps) or "(not found)")
        if not steps and proc.poll() is None:
            # No squeue answer: srun aborts the step itself on SIGTERM.
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
