"""Walltime awareness: the job's end from SLURM's output, the decision to
start a call, SIGUSR1, and queued calls failing with WalltimeExceeded
(the SLURM jobs themselves: tests/slurm/test_walltime_slurm.py)."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path

import pytest

from sulis_executor import SulisDaskExecutor, WalltimeExceeded, _walltime
from sulis_executor._walltime import (
    Walltime,
    job_end_time,
    may_start,
    parse_end_time,
    parse_scontrol_field,
)
from sulis_executor.config import resolve_options

pytestmark = pytest.mark.timeout(120)

END = "2026-12-06T07:30:28"
END_EPOCH = time.mktime(time.strptime(END, "%Y-%m-%dT%H:%M:%S"))
SCONTROL = ("JobId=1 JobName=wrap\n   Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0\n"
            f"   StartTime=2026-12-06T07:29:28 EndTime={END} Deadline=N/A\n")


def test_parse_end_time() -> None:
    assert parse_end_time(END + "\n") == END_EPOCH
    for none in ("Unknown", "N/A", "NONE", "", "not a time"):
        assert parse_end_time(none) is None


def test_parse_scontrol_fields() -> None:
    assert parse_scontrol_field(SCONTROL, "EndTime") == END
    assert parse_scontrol_field(SCONTROL, "Requeue") == "1"
    assert parse_scontrol_field(SCONTROL, "Time") is None  # not StartTime's tail


def test_job_end_time_sources_in_order() -> None:
    asked: list[list[str]] = []

    def run(answers: dict[str, str | None]):
        def fake(command: list[str]) -> str | None:
            asked.append(command)
            return answers.get(command[0])
        return fake

    assert job_end_time({}, run({})) is None and asked == []  # not in a job
    assert job_end_time({"SLURM_JOB_END_TIME": "1700000000", "SLURM_JOB_ID": "7"}, run({})) == 1.7e9
    assert asked == []
    env = {"SLURM_JOB_ID": "7"}
    assert job_end_time(env, run({"squeue": END + "\n"})) == END_EPOCH
    assert asked[-1] == ["squeue", "-h", "-j", "7", "-o", "%e"]
    assert job_end_time(env, run({"squeue": None, "scontrol": SCONTROL})) == END_EPOCH
    assert asked[-1] == ["scontrol", "show", "job", "7"]
    assert job_end_time(env, run({"squeue": "Unknown\n"})) is None  # no limit
    assert job_end_time(env, run({})) is None


def test_may_start() -> None:
    assert may_start(0.0, None, 100.0, 60.0)  # no end
    assert may_start(0.0, 100.0, None, 60.0)  # unmeasured: assumed to fit in the margin
    assert not may_start(41.0, 100.0, None, 60.0)
    assert may_start(0.0, 100.0, 39.0, 60.0)
    assert not may_start(0.0, 100.0, 40.0, 60.0)


def test_walltime_stops_once_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    wall = Walltime(100.0, 10.0, clock=lambda: now[0])
    wall.observe(5.0)
    assert not wall.stopped()
    now[0] = 86.0
    with caplog.at_level("WARNING", logger="sulis_executor"):
        assert wall.stopped()
        now[0] = 0.0  # stopped for good
        assert wall.stopped()
    assert [r.getMessage().count("time limit is near") for r in caplog.records] == [1]


def test_margin_option_resolves_from_argument_env_and_dask_config() -> None:
    assert resolve_options({}, {}, lambda key: None).walltime_margin == 60.0
    assert resolve_options({}, {"SULIS_EXECUTOR_WALLTIME_MARGIN": "2 minutes"},
                           lambda key: None).walltime_margin == 120.0
    config = {"sulis-executor.walltime-margin": 30}
    assert resolve_options({}, {}, config.get).walltime_margin == 30.0
    assert resolve_options({"walltime_margin": 5}, {"SULIS_EXECUTOR_WALLTIME_MARGIN": "9"},
                           config.get).walltime_margin == 5.0
    with pytest.raises(ValueError, match="SULIS_EXECUTOR_WALLTIME_MARGIN"):
        resolve_options({}, {"SULIS_EXECUTOR_WALLTIME_MARGIN": "-1"}, lambda key: None)


def test_error_is_a_futures_timeout_error() -> None:
    assert issubclass(WalltimeExceeded, concurrent.futures.TimeoutError)


@pytest.fixture
def restore_sigusr1():
    previous = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, previous)
    _walltime._signalled.clear()


def test_sigusr1_handler_only_in_a_job_and_only_without_the_users(restore_sigusr1) -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    assert not _walltime.install_signal_handler({})  # not in a SLURM job
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL

    def users(signum, frame):
        pass

    signal.signal(signal.SIGUSR1, users)
    assert not _walltime.install_signal_handler({"SLURM_JOB_ID": "7"})
    assert signal.getsignal(signal.SIGUSR1) is users
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    assert _walltime.install_signal_handler({"SLURM_JOB_ID": "7"})
    assert not _walltime.signalled()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert _walltime.signalled()
    assert Walltime(None, 60.0).stopped()


def test_requeue_runs_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "log"
    fake = tmp_path / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n[ "$2" = 7 ]\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    from sulis_executor import requeue

    requeue({"SLURM_JOB_ID": "7"})
    assert log.read_text() == "requeue 7\n"
    with pytest.raises(RuntimeError, match="scontrol requeue 8 failed"):
        requeue({"SLURM_JOB_ID": "8"})
    with pytest.raises(RuntimeError, match="not in a SLURM job"):
        requeue({})


def test_queued_calls_fail_with_walltime_exceeded_once_the_margin_is_reached() -> None:
    now = [0.0]
    with SulisDaskExecutor(max_workers=1) as ex:
        wall = Walltime(1000.0, 10.0, clock=lambda: now[0])
        ex._engine._walltime = wall
        assert ex.submit(pow, 2, 3).result(timeout=30) == 8
        # The margin is reached: nothing queued from now on starts.
        now[0] = 995.0
        futures = [ex.submit(pow, 2, i) for i in range(5)]
        for future in futures:
            with pytest.raises(WalltimeExceeded, match=r"not started\. 1 calls finished"):
                future.result(timeout=30)
        assert "and 5 were not started" in str(futures[-1].exception())
        results = ex.map(pow, [2, 2], [1, 2])
        with pytest.raises(concurrent.futures.TimeoutError, match="time limit is near"):
            next(results)


def test_a_default_margin_is_at_most_a_quarter_of_the_time_left() -> None:
    # A one-minute job (55 s left at start) with the default 60 s margin
    # would start no call at all.
    from sulis_executor._walltime import Walltime

    short = Walltime(None, 60.0, clock=lambda: 1000.0)
    short.set_end(1055.0, margin_is_default=True)
    assert short.margin == 55.0 / 4 and not short.stopped()
    long = Walltime(None, 60.0, clock=lambda: 1000.0)
    long.set_end(1000.0 + 12 * 3600, margin_is_default=True)
    assert long.margin == 60.0
    chosen = Walltime(None, 60.0, clock=lambda: 1000.0)
    chosen.set_end(1055.0, margin_is_default=False)
    assert chosen.margin == 60.0 and chosen.stopped()
