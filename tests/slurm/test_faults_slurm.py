"""Nothing lost, nothing hung, no one else let in: faults, as real SLURM jobs.

* TLS: inside an srun-mode job, a ``distributed.Client`` without the job's
  credentials is refused by the scheduler, over ``tls://`` (another
  self-signed certificate) and over ``tcp://`` to the same port.
* A whole (emulated) node lost mid-map: every worker process on n2 is
  SIGKILLed after some results; the map still yields every result, once, in
  order, from the remaining nodes, and the job completes cleanly.
* Teardown never burns an allocation:
  - srun mode, the script raises after creating the executor (inside a
    ``with`` block, and with a bare executor left to the interpreter's exit):
    the script ends within seconds and the worker step is gone;
  - mpi mode, rank 0 raises after creating the executor: every rank ends;
  - ``scancel`` of a running srun-mode job (SIGTERM to every process of the
    job, as SLURM also sends at the time limit): the job ends, nothing stays;
  - SIGTERM to the script alone (``timeout``, ``kill``; what the script sees
    when SLURM signals the job): the executor shuts down, the worker step
    ends, and the batch script goes on;
  - the job reaching its time limit (``--time=1``, SLURM's smallest): the
    script unwinds through ``finally`` and nothing of the job remains.
* ``kill_workers()`` in srun mode, mid-call: SLURM kills the step's tasks,
  the running call fails as a broken pool, the script goes on and ends
  cleanly, and srun's reports of the tasks it killed are not shown.

All jobs are submitted at once by the module fixture and run side by side
(14 of the cluster's 12 CPUs, so one may wait a moment in the queue).
"""

from __future__ import annotations

import json
import os
import re
import signal
import textwrap
import time

import pytest

from tests.slurm.jobs import (
    Job,
    assert_no_processes_left,
    finished_cleanly,
    poll_job,
    result_line,
    scancel,
    shape,
    submit,
    wait_for_job,
    wait_for_mpi_job,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]


#: Polls squeue until our worker step is gone (at most 20 s) and prints how
#: long that took; used after each script in the batch scripts below.
STEPS_GONE = r'''
steps_gone() {
    local start=$SECONDS
    while squeue -h -s -j "$SLURM_JOB_ID" -o %j | grep -q '^sulis-workers-'; do
        (( SECONDS - start < 20 )) || { echo "STEPS_LEFT $(squeue -h -s -j "$SLURM_JOB_ID" -o %j)"; return; }
        sleep 0.2
    done
    echo "STEPS_GONE after $(( SECONDS - start )) s"
}
'''

# -- TLS refusal and a node lost mid-map (3 nodes x 2 tasks) ------------------

NODE_LOSS = '''
import os, signal, time
from _common import report
from tests.slurm import recorded
from distributed import Client
from distributed.security import Security
from sulis_executor import SulisDaskExecutor

def refusal(address, security):
    started = time.monotonic()
    try:
        client = Client(address, security=security, timeout=5, set_as_default=False)
    except Exception as error:
        return {"refused": type(error).__name__, "seconds": round(time.monotonic() - started, 2)}
    client.close()
    return {"refused": None}

N, KILL_AFTER = 300, 30
with SulisDaskExecutor() as ex:
    address = ex.client.scheduler.address
    tls = refusal(address, Security.temporary())
    tcp = refusal("tcp://" + address.split("://", 1)[1], None)
    # Each node's agent (the Dask worker) and its parent, the node's process,
    # which its agent and members die with: killing that loses the node.
    where = ex.client.run(lambda: (os.environ.get("SLURMD_NODENAME"), os.getppid()))
    victims = sorted(pid for node, pid in where.values() if node == "n2")
    workers_before = ex.num_workers
    results = []
    for k, r in enumerate(ex.map(recorded.square, range(N))):
        results.append(r)
        if k + 1 == KILL_AFTER:
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            print(f"killed {victims} on n2 after {KILL_AFTER} results", flush=True)
    deadline = time.monotonic() + 30
    while ex.num_workers > workers_before - len(victims) and time.monotonic() < deadline:
        time.sleep(0.1)
    after = sorted(set(ex.client.run(lambda: os.environ.get("SLURMD_NODENAME")).values()))
    still_works = ex.submit(pow, 7, 2).result(timeout=30)
    workers_after = ex.num_workers

report(tls=tls, tcp=tcp, address=address, victims=victims, workers_before=workers_before,
       workers_after=workers_after, nodes_after=after, still_works=still_works,
       ok=results == [i * i for i in range(N)], n_results=len(results),
       **recorded.summary(N))
'''

# -- srun mode: the script raises after creating the executor -----------------

SRUN_RAISES = '''
import sys, time
from sulis_executor import SulisDaskExecutor

if sys.argv[1] == "with":
    with SulisDaskExecutor() as ex:
        list(ex.map(abs, range(10)))
        print("RAISING with", time.time(), ex.num_workers, flush=True)
        raise RuntimeError("user error inside the with block")
else:
    ex = SulisDaskExecutor()
    list(ex.map(abs, range(10)))
    print("RAISING bare", time.time(), ex.num_workers, flush=True)
    raise RuntimeError("user error with the executor still open")
'''

SRUN_RAISES_JOB = STEPS_GONE + '''
"$PYTHON" raises.py with
echo "EXITED with $? $(date +%s.%N)"
steps_gone
"$PYTHON" raises.py bare
status=$?
echo "EXITED bare $status $(date +%s.%N)"
steps_gone
exit $status
'''

# -- mpi mode: rank 0 raises after creating the executor ----------------------

MPI_RAISES = '''
import time
from sulis_executor import SulisDaskExecutor

ex = SulisDaskExecutor()
list(ex.map(abs, range(10)))
print("RAISING rank0", time.time(), ex.num_workers, flush=True)
raise RuntimeError("rank 0 failed with the executor still open")
'''

# No --kill-on-bad-exit: the ranks must end by themselves.
MPI_RAISES_JOB = '''
srun --mpi=pmi2 "$PYTHON" mpi_raises.py
status=$?
echo "EXITED mpi $status $(date +%s.%N)"
exit $status
'''

# -- srun mode: SIGTERM (scancel, or to the script alone) mid-map -------------

SIGTERMED = '''
import json, os, time
from sulis_executor import SulisDaskExecutor

def slow(x):
    time.sleep(0.05)
    return x

try:
    with SulisDaskExecutor() as ex:
        workers = sorted(ex.client.run(os.getpid).values())
        done = 0
        for _ in ex.map(slow, range(10**6)):
            done += 1
            if done == 20:
                print("READY " + json.dumps({"pid": os.getpid(), "workers": workers}), flush=True)
finally:
    print("FINALLY", time.time(), flush=True)
'''

#: For the time limit: calls that outlast it. The executor starts no call
#: that it expects to end past the limit (see _walltime), but these measure
#: short until the 21st, which then runs into the limit and SLURM's SIGTERM.
SIGTERMED_AT_LIMIT = SIGTERMED.replace("time.sleep(0.05)", "time.sleep(0.05 if x < 20 else 300)")
assert SIGTERMED_AT_LIMIT != SIGTERMED

SIGTERMED_JOB = STEPS_GONE + '''
"$PYTHON" sigtermed.py
status=$?
echo "EXITED sigterm $status $(date +%s.%N)"
steps_gone
exit $status
'''

# -- srun mode: kill_workers() mid-call ----------------------------------------

KILLED = '''
import json, os, time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from sulis_executor import SulisDaskExecutor

STARTED = Path("started").resolve()

def stay():
    STARTED.touch()
    time.sleep(600)

def alive(pid):
    try:
        os.kill(pid, 0)  # every node is this machine
    except ProcessLookupError:
        return False
    return True

def within(seconds, condition):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(condition())

with SulisDaskExecutor() as ex:
    workers = sorted(ex.client.run(os.getpid).values())
    running = ex.submit(stay)
    assert within(60, STARTED.exists)
    ex.kill_workers()
    try:
        running.result(timeout=30)
        outcome = "no error"
    except BrokenProcessPool as error:
        outcome = str(error)
    gone = within(30, lambda: not any(alive(pid) for pid in workers))
print("RESULT " + json.dumps({"outcome": outcome, "workers": workers, "gone": gone}), flush=True)
'''

KILLED_JOB = STEPS_GONE + '''
"$PYTHON" killed.py
status=$?
steps_gone
exit $status
'''

JOBS = {
    # name -> (python file name, python source, batch body, shape, mpi)
    "node_loss": ("node_loss.py", NODE_LOSS,
                  'export PYTHONPATH="$EXAMPLES_DIR:$PYTHONPATH"\n"$PYTHON" node_loss.py\n',
                  shape(3, 2)),
    "srun_raises": ("raises.py", SRUN_RAISES, SRUN_RAISES_JOB, shape(1, 1)),
    "mpi_raises": ("mpi_raises.py", MPI_RAISES, MPI_RAISES_JOB, shape(3, 1)),
    "scancel": ("sigtermed.py", SIGTERMED, SIGTERMED_JOB, shape(1, 1)),
    "sigterm_script": ("sigtermed.py", SIGTERMED, SIGTERMED_JOB, shape(2, 1)),
    # SLURM's smallest time limit is a minute; it then sends SIGTERM, as scancel.
    "time_limit": ("sigtermed.py", SIGTERMED_AT_LIMIT, SIGTERMED_JOB, (*shape(1, 1), "--time=1")),
    "kill_workers": ("killed.py", KILLED, KILLED_JOB, shape(1, 1)),
}


@pytest.fixture(scope="module")
def submitted(slurm_conf: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    jobs = {}
    for name, (filename, source, body, options) in JOBS.items():
        workdir = tmp_path_factory.mktemp(name)
        (workdir / filename).write_text(textwrap.dedent(source))
        script = workdir / "job.sbatch"
        script.write_text("#!/bin/bash\n" + body)
        jobs[name] = submit(script, workdir, slurm_conf, *options)
    return jobs


def lines_starting(job: Job, prefix: str) -> list[list[str]]:
    return [line.split()[1:] for line in job.text().splitlines() if line.startswith(prefix + " ")]


def wait_for_line(job: Job, pattern: str, timeout: float) -> re.Match[str]:
    """Poll the job's output until a line matches ``pattern``."""
    return poll_job(job, lambda: re.search(pattern, job.text(), re.MULTILINE),
                    f"no line matching {pattern!r}", timeout, interval=0.2)


def test_tls_refuses_strangers_and_a_lost_node_loses_no_result(
        submitted: dict[str, Job]) -> None:
    job = finished_cleanly(submitted["node_loss"])
    r = result_line(job)
    # No one else let in: both attempts raised, promptly.
    assert str(r["address"]).startswith("tls://"), job.describe()
    assert r["tls"]["refused"], job.describe()  # type: ignore[index]
    assert r["tcp"]["refused"], job.describe()  # type: ignore[index]
    # Nothing lost: every result, once, in order, though n2 died mid-map.
    assert r["workers_before"] == 6 and len(r["victims"]) == 1, job.describe()  # type: ignore[arg-type]
    assert r["ok"] is True and r["n_results"] == 300, job.describe()
    assert r["executed"] is True, job.describe()
    assert r["nodes_after"] == ["n1", "n3"], job.describe()
    assert r["workers_after"] == 4 and r["still_works"] == 49, job.describe()


def test_srun_script_that_raises_ends_at_once_and_its_step_with_it(
        submitted: dict[str, Job]) -> None:
    job = wait_for_job(submitted["srun_raises"], timeout=150)
    assert_no_processes_left(job)
    text = job.text()
    assert job.state == "FAILED" and job.exit_code == "1:0", job.describe()
    raised = {fields[0]: float(fields[1]) for fields in lines_starting(job, "RAISING")}
    exited = {fields[0]: (int(fields[1]), float(fields[2])) for fields in lines_starting(job, "EXITED")}
    assert set(raised) == set(exited) == {"with", "bare"}, job.describe()
    for how in ("with", "bare"):
        status, when = exited[how]
        assert status == 1, job.describe()
        assert when - raised[how] < 30, f"{how}: {when - raised[how]:.1f} s\n{job.describe()}"
    assert len(lines_starting(job, "STEPS_GONE")) == 2, job.describe()
    # The user's own traceback, and nothing else.
    assert text.count("Traceback") == 2, job.describe()
    assert text.count("RuntimeError: user error") == 2, job.describe()


@pytest.mark.mpi
def test_mpi_rank0_that_raises_ends_every_rank(submitted: dict[str, Job]) -> None:
    job = wait_for_mpi_job(submitted["mpi_raises"], timeout=150)
    assert_no_processes_left(job)
    assert job.state == "FAILED" and job.exit_code != "0:0", job.describe()
    (raised,) = lines_starting(job, "RAISING")
    (exited,) = lines_starting(job, "EXITED")
    assert raised[2] == "2", job.describe()  # two worker ranks took part
    assert exited[1] != "0", job.describe()
    assert float(exited[2]) - float(raised[1]) < 30, job.describe()
    assert job.text().count("Traceback") == 1, job.describe()


def test_scancel_of_a_running_job_leaves_nothing(submitted: dict[str, Job]) -> None:
    job = submitted["scancel"]
    wait_for_line(job, r"^READY ", timeout=150)
    cancelled = time.monotonic()
    scancel(job, check=True)
    wait_for_job(job, timeout=60)
    assert job.state == "CANCELLED", job.describe()
    assert time.monotonic() - cancelled < 30, job.describe()
    assert_no_processes_left(job)


def test_sigterm_to_the_script_shuts_the_executor_down(submitted: dict[str, Job]) -> None:
    job = submitted["sigterm_script"]
    ready = json.loads(wait_for_line(job, r"^READY (.*)$", timeout=150).group(1))
    signalled = time.time()
    os.kill(ready["pid"], signal.SIGTERM)  # every node is this machine
    wait_for_job(job, timeout=90)
    assert_no_processes_left(job)
    (exited,) = lines_starting(job, "EXITED")
    assert exited[1] != "0", job.describe()
    assert float(exited[2]) - signalled < 30, job.describe()
    assert lines_starting(job, "STEPS_GONE"), job.describe()
    assert lines_starting(job, "FINALLY"), job.describe()  # finally blocks ran
    assert job.state == "FAILED" and job.exit_code != "0:0", job.describe()
    assert "Traceback" not in job.text(), job.describe()


def test_reaching_the_time_limit_shuts_the_executor_down_and_leaves_nothing(
    submitted: dict[str, Job],
) -> None:
    job = submitted["time_limit"]
    wait_for_line(job, r"^READY ", timeout=150)
    # A one-minute limit, checked by slurmctld every few tens of seconds.
    wait_for_job(job, timeout=240)
    assert job.state == "TIMEOUT", job.describe()
    assert_no_processes_left(job)
    assert lines_starting(job, "FINALLY"), job.describe()  # the script unwound
    assert "Traceback" not in job.text(), job.describe()


def test_kill_workers_in_an_srun_job_ends_the_step_at_once_and_fails_its_running_call(
        submitted: dict[str, Job]) -> None:
    job = finished_cleanly(submitted["kill_workers"])
    r = result_line(job)
    assert "killed by kill_workers()" in str(r["outcome"]), job.describe()
    assert len(r["workers"]) == 1 and r["gone"] is True, job.describe()  # type: ignore[arg-type]
    assert lines_starting(job, "STEPS_GONE"), job.describe()
    assert "srun: " not in job.text(), job.describe()
