"""When the SLURM job ends, and whether a call may still start before then.

The end comes from, in order: ``SLURM_JOB_END_TIME`` (seconds since the
epoch, set by newer SLURM versions in the batch step), ``squeue -h -j
$SLURM_JOB_ID -o %e``, then ``scontrol show job $SLURM_JOB_ID``'s
``EndTime=`` (SLURM 22.05, Debian's, sets no variable: squeue answers). Both
commands print the end in the local time zone, as ``2026-12-06T08:30:00``;
a job without a limit shows ``Unknown``, ``N/A`` or ``NONE``: no end.

The executor starts a batch of calls only while ``expected + margin`` is
less than the time left: see :class:`Walltime`. ``expected`` is the
measured duration of recent batches (they are sized from measured call
times, see ``_batching``); until a batch has been measured, calls are
assumed to fit, and the margin (``walltime_margin``, 60 s by default) is
what protects them: set it above your calls' duration if the first ones may
be long.

A SIGUSR1 (``#SBATCH --signal=B:USR1@120``, sent ahead of the limit) stops
starting calls the same way (:func:`install_signal_handler`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

logger = logging.getLogger("sulis_executor")

#: What SLURM prints for a job without an end time.
_NO_END = {"", "UNKNOWN", "N/A", "NONE", "UNLIMITED", "INFINITE"}


def parse_end_time(text: str) -> float | None:
    """The epoch seconds of SLURM's ``2026-12-06T08:30:00`` (local time),
    or None for no end (``Unknown``, ``N/A``, ...) or text that is not one."""
    text = text.strip()
    if text.upper() in _NO_END:
        return None
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, OverflowError):
        return None


def parse_scontrol_field(text: str, field: str) -> str | None:
    """A ``Field=value`` of ``scontrol show job``'s output, or None."""
    match = re.search(rf"(?:^|\s){re.escape(field)}=(\S*)", text)
    return match.group(1) if match else None


def _run(command: list[str], timeout: float = 10.0) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def job_end_time(environ: Mapping[str, str] = os.environ,
                 run: Callable[[list[str]], str | None] = _run) -> float | None:
    """When this SLURM job ends (epoch seconds), or None: not in a job, no
    limit, or SLURM would not say."""
    raw = environ.get("SLURM_JOB_END_TIME", "").strip()
    if raw:
        try:
            end = float(raw)
            return end if end > 0 else None
        except ValueError:
            pass
    job_id = environ.get("SLURM_JOB_ID", "").strip()
    if not job_id:
        return None
    out = run(["squeue", "-h", "-j", job_id, "-o", "%e"])
    if out is not None and out.strip():
        return parse_end_time(out.strip().splitlines()[0])
    out = run(["scontrol", "show", "job", job_id])
    if out is not None:
        value = parse_scontrol_field(out, "EndTime")
        return None if value is None else parse_end_time(value)
    return None


def may_start(now: float, end: float | None, expected: float | None, margin: float) -> bool:
    """Whether a batch expected to take ``expected`` seconds (None: not yet
    measured, taken as 0) may start at ``now``, ending by ``end`` less ``margin``."""
    if end is None:
        return True
    return now + (expected or 0.0) + margin < end


# -- SIGUSR1: stop starting calls --------------------------------------------

_signalled = threading.Event()
#: Each engine's wake-up, called from the signal handler (must be reentrant).
_wakers: weakref.WeakSet[Any] = weakref.WeakSet()
_installed = False


def signalled() -> bool:
    """Whether SIGUSR1 told the executors to stop starting calls."""
    return _signalled.is_set()


def register(engine: Any) -> None:
    _wakers.add(engine)


def _on_sigusr1(signum: int, frame: object) -> None:
    _signalled.set()
    for engine in list(_wakers):
        engine.wake()  # a SimpleQueue.put: safe in a signal handler


def install_signal_handler(environ: Mapping[str, str] = os.environ) -> bool:
    """In a SLURM job, from the main thread, with no handler of the user's
    for SIGUSR1: make SIGUSR1 stop the executors starting calls. True if
    the handler is (now) ours."""
    global _installed
    if not hasattr(signal, "SIGUSR1") or not environ.get("SLURM_JOB_ID"):
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        current = signal.getsignal(signal.SIGUSR1)
        if current is _on_sigusr1:
            return True
        if current is not signal.SIG_DFL:
            return False  # the user's handler stays
        signal.signal(signal.SIGUSR1, _on_sigusr1)
    except (ValueError, OSError):
        return False
    _installed = True
    return True


def requeue(environ: Mapping[str, str] = os.environ) -> None:
    """Requeue this SLURM job (``scontrol requeue $SLURM_JOB_ID``): SLURM ends
    it now and queues it again, so call it last, once results are saved.
    The job must have been submitted with ``--requeue`` (or the cluster
    requeue jobs by default). Raises ``RuntimeError`` if SLURM refuses."""
    job_id = environ.get("SLURM_JOB_ID", "").strip()
    if not job_id:
        raise RuntimeError("requeue(): not in a SLURM job (SLURM_JOB_ID is not set)")
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True,
                                text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        raise RuntimeError(f"requeue(): scontrol requeue {job_id} failed: {error}") from error
    if result.returncode != 0:
        raise RuntimeError(f"requeue(): scontrol requeue {job_id} failed: "
                           f"{result.stderr.strip() or result.returncode}")


class Walltime:
    """One engine's view: the job's end, the margin, and whether it is reached."""

    def __init__(self, end: float | None, margin: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.end = end
        self.margin = margin
        self._clock = clock
        self.reason: str | None = None
        # Seconds recent batches took (an exponential average): what the next may take.
        self.expected: float | None = None

    def set_end(self, end: float | None, margin_is_default: bool) -> None:
        """The job's end, once known. A default margin is at most a quarter
        of the time left now: 60 s would stop a one-minute job before its
        first call (an explicit margin is the user's to keep)."""
        self.end = end
        if end is not None and margin_is_default:
            self.margin = min(self.margin, max(0.0, end - self._clock()) / 4)

    def observe(self, seconds: float) -> None:
        self.expected = seconds if self.expected is None else max(
            seconds, 0.7 * self.expected + 0.3 * seconds)

    def stopped(self) -> bool:
        """Whether no call may start any more (logs the reason once)."""
        if self.reason is not None:
            return True
        if signalled():
            self.reason = "SIGUSR1 received (SLURM's early warning of the job's end)"
        elif not may_start(self._clock(), self.end, self.expected, self.margin):
            left = max(0.0, (self.end or 0.0) - self._clock())
            self.reason = (f"the job's time limit is near ({left:.0f} s left, walltime_margin "
                           f"{self.margin:g} s, calls taking {self.expected or 0.0:.1f} s)")
        else:
            return False
        logger.warning("sulis_executor: %s: no more calls start; running calls finish", self.reason)
        return True
