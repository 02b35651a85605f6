"""The Sulis Dask page's recipes, as printed, with the executor dropped in.

The page (https://sulis-hpc.github.io/advanced/ensemble/dask.html) shows
four ways to spread work over nodes: dask-mpi with ``client.map``
(``dask_futures.py``), dask-mpi with joblib (``dask_joblib.py``), a cluster
started by the batch script and found through a scheduler file
(``dask_file.slurm``, ``dask_file_init.py``), and the plain
``concurrent.futures`` script it extends (``example_futures.py``, from the
single-node page). ``sulis_page/`` holds each, as printed but for the
network interface (``eth0``, the test cluster's nodes', for ``ib0``), in two forms:

* ``*.minimal.py``: the smallest change a user would make to use the
  executor, keeping the rest (dask-mpi's ``initialize()``, their own
  ``Client``, the cluster commands of the batch script);
* ``*.recommended.py`` (and ``*.recommended.slurm`` where the job script
  changes too): the change docs/migrating.rst recommends.

Changed lines end in a ``was:`` comment. The job scripts run as printed:
``module`` is a stand-in that does nothing (``sulis_page/bin``),
``SLURM_MPI_TYPE=pmi2`` makes their plain ``srun`` start MPI as Sulis's
does, and ``sbatch`` options shrink the allocation to the test cluster's
size. A ``sitecustomize`` on ``PYTHONPATH`` shows the ``sulis_executor``
logger at INFO (the launch mode and its reason), as
``logging.basicConfig(level=logging.INFO)`` in the script would.

Every job must complete with exit code 0, print no traceback, leave no
process behind, and print the page's output. Where nothing of the page's
Dask set-up is kept (the recommended forms, and the plain
``concurrent.futures`` script), that output is all the job prints.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm.jobs import (
    JOB_SHAPE,
    REPO,
    Job,
    finished_cleanly,
    submit,
    wait_for_job,
    wait_for_mpi_job,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

RECIPES = Path(__file__).resolve().parent / "sulis_page"
#: The single-node page's allocation (one task with all its CPUs), shrunk.
ONE_TASK = ("--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", "--mem-per-cpu=500")
#: A job that goes wrong is cancelled by SLURM well before the module's timeout.
TIME_LIMIT = "--time=5"

SQUARES_4 = "[0, 1, 4, 9]"          # dask_futures.py: N = SLURM_NTASKS - 2 = 4
SQUARES_6 = "[0, 1, 4, 9, 16, 25]"  # dask_file_init.py: N = SLURM_NTASKS = 6
SQUARES_128 = str([x * x for x in range(128)])  # example_futures.py: N=128


@dataclasses.dataclass(frozen=True)
class Recipe:
    job_script: str
    python: str
    #: The name the job script runs the Python script by.
    runs_as: str
    options: tuple[str, ...]
    mpi: bool
    #: The lines the page's script prints, in order.
    expected: tuple[str, ...]
    #: ``launch='auto'``'s choice, and words its logged reason must contain.
    mode: str
    reason: str
    #: Whether the job prints nothing but ``expected`` (and the executor's log).
    quiet: bool


RECIPE_RUNS = {
    "dask_futures-minimal": Recipe(
        "dask_futures.slurm", "dask_futures.minimal.py", "dask_futures.py", JOB_SHAPE, True,
        ("4 workers available and ready", SQUARES_4), "attach", "dask_mpi.initialize()", False),
    "dask_futures-recommended": Recipe(
        "dask_futures.slurm", "dask_futures.recommended.py", "dask_futures.py", JOB_SHAPE, True,
        ("5 workers available and ready", SQUARES_4), "mpi", "MPI ranks", True),
    "dask_joblib-minimal": Recipe(
        "dask_joblib.slurm", "dask_joblib.minimal.py", "dask_joblib.py", JOB_SHAPE, True,
        ("4 workers available and ready", "0", "1", "4", "9"), "attach", "dask_mpi.initialize()",
        False),
    "dask_joblib-recommended": Recipe(
        "dask_joblib.slurm", "dask_joblib.recommended.py", "dask_joblib.py", JOB_SHAPE, True,
        ("5 workers available and ready", "0", "1", "4", "9"), "mpi", "MPI ranks", True),
    "dask_file-minimal": Recipe(
        "dask_file.slurm", "dask_file_init.minimal.py", "dask_file_init.py", JOB_SHAPE, False,
        ("6 workers available and ready", SQUARES_6), "attach", "a distributed.Client is open", False),
    "dask_file-recommended": Recipe(
        "dask_file.recommended.slurm", "dask_file_init.recommended.py", "dask_file_init.py",
        JOB_SHAPE, False, ("6 workers available and ready", SQUARES_6), "srun", "batch script", True),
    "example_futures-minimal": Recipe(
        "example_futures.slurm", "example_futures.minimal.py", "example_futures.py", ONE_TASK,
        False, (SQUARES_128,), "local", "inside step", True),
    "example_futures-recommended": Recipe(
        "example_futures.recommended.slurm", "example_futures.recommended.py",
        "example_futures.py", JOB_SHAPE, False, (SQUARES_128,), "srun", "batch script", True),
}


def recipe_env(mpi: bool) -> dict[str, str]:
    """What the job scripts find: the ``module`` stand-in and this Python
    first on ``PATH``, and the log hook and this repository importable.

    For the MPI recipes, a plain ``srun`` starts MPI (Sulis's default; here
    ``MpiDefault=none``) and ends the step if a rank fails. And MPICH uses
    its OFI netmod (TCP) rather than UCX: a UCX business card is memory,
    run-length encoded, so its size depends on the script, and
    ``dask_futures.minimal.py``'s hit SLURM's PMI-1 misparse (see
    ``jobs.PMI2_MISPARSE``) in 7 of 8 runs, some leaving its ranks in
    ``MPI_Init``, where resubmitting does not help; OFI's cards are short
    (no misparse in 9 MPI jobs of these recipes, 3 of them that one)."""
    path = [str(RECIPES / "bin"), os.path.dirname(sys.executable), os.environ.get("PATH", "")]
    python_path = [str(RECIPES / "log_hook"), str(REPO), os.environ.get("PYTHONPATH", "")]
    env = {
        "PATH": os.pathsep.join(filter(None, path)),
        "PYTHONPATH": os.pathsep.join(filter(None, python_path)),
    }
    if mpi:
        # (MPICH's netmod is OFI over TCP in every job: see jobs.job_env.)
        env.update(SLURM_MPI_TYPE="pmi2", SLURM_KILL_BAD_EXIT="1")
    return env


@pytest.fixture(scope="module")
def recipe_jobs(slurm_conf: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Job]]:
    """Every recipe in both forms, submitted together; each runs in a
    directory of its own holding the Python script under its printed name."""
    # (Only one job runs dask_file.slurm: as printed, its 'dask scheduler'
    # listens on Dask's fixed port, 8786.)
    jobs: dict[str, Job] = {}
    for name, recipe in RECIPE_RUNS.items():
        workdir: Path = tmp_path_factory.mktemp(name)
        shutil.copy(RECIPES / recipe.python, workdir / recipe.runs_as)
        jobs[name] = submit(RECIPES / recipe.job_script, workdir, slurm_conf, *recipe.options,
                            TIME_LIMIT, env=recipe_env(recipe.mpi))
    yield jobs
    for job in jobs.values():
        end_leftovers(job)


def end_leftovers(job: Job) -> None:
    """Kill what a failed job left running: the test cluster's SLURM tracks
    a batch script's children by parentage (proctrack/linuxproc), so a
    'dask scheduler' started in the background outlives a cancelled job,
    keeping port 8786 from the next run. (A job that passed left nothing:
    its test checked.)"""
    needle = f"SULIS_TEST_MARKER={job.marker}".encode()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:
            continue  # gone already, or not ours


def finished(recipe_jobs: dict[str, Job], name: str) -> Job:
    wait = wait_for_mpi_job if RECIPE_RUNS[name].mpi else wait_for_job
    return finished_cleanly(recipe_jobs[name], timeout=300, wait=wait)


def printed_lines(job: Job) -> list[str]:
    """The job's output, without the executor's log lines."""
    return [line for line in job.text().splitlines() if not line.startswith("sulis_executor ")]


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=[pytest.mark.mpi] if recipe.mpi else [])
    for name, recipe in RECIPE_RUNS.items()
])
def test_recipe_runs_as_printed_with_the_executor_dropped_in(recipe_jobs: dict[str, Job],
                                                             name: str) -> None:
    recipe = RECIPE_RUNS[name]
    job = finished(recipe_jobs, name)
    lines = printed_lines(job)
    if recipe.quiet:
        assert lines == list(recipe.expected), job.describe()
    else:
        found = [line for line in lines if line in recipe.expected]
        assert found == list(recipe.expected), job.describe()
    # Every process that made an executor logged its choice (each MPI rank does).
    chosen = {line for line in job.text().splitlines()
              if line.startswith("sulis_executor INFO: launch mode ")}
    assert len(chosen) == 1, job.describe()
    choice = chosen.pop()
    assert choice.startswith(f"sulis_executor INFO: launch mode {recipe.mode!r}: "), job.describe()
    assert recipe.reason in choice, job.describe()
