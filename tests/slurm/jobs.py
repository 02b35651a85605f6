"""Helpers for the SLURM integration tests: submit a batch script, wait for
the job with a deadline, read its output, and check it left no processes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"

#: A small job for every mode: 3 nodes x 2 tasks, 1 CPU each (6 of the 12).
JOB_SHAPE = ("--nodes=3", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem-per-cpu=500")


def shape(nodes: int, tasks_per_node: int) -> tuple[str, ...]:
    """sbatch options for ``nodes`` x ``tasks_per_node`` tasks of 1 CPU each."""
    return (f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", "--cpus-per-task=1",
            "--mem-per-cpu=500")


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


#: Every node's interface on the test cluster's network (see cluster.sh).
NODE_INTERFACE = "eth0"


def cluster_network(slurm_conf: str) -> dict[str, str]:
    """The test cluster's network namespaces, as ``cluster.sh start`` wrote
    them next to ``slurm.conf`` (``SULIS_SLURM_LOGIN_NETNS`` and friends)."""
    path = Path(slurm_conf).parent / "netns.env"
    found = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            found[key.strip()] = value.strip()
    return found


def in_netns(namespace: str, command: list[str]) -> list[str]:
    """``command`` run in network namespace ``namespace`` (and nothing else:
    the same mounts, PIDs, files)."""
    return ["nsenter", f"--net=/run/netns/{namespace}", *command]


def slurm_command(slurm_conf: str, *command: str) -> list[str]:
    """A SLURM client command (sbatch, squeue, scontrol, scancel, srun) as
    run from the test cluster's login node: the root namespace, where the
    tests run, has no address on the cluster's network."""
    return in_netns(cluster_network(slurm_conf)["SULIS_SLURM_LOGIN_NETNS"],
                    ["env", f"SLURM_CONF={slurm_conf}", *command])


def node_namespace(slurm_conf: str, node: str) -> str:
    """The network namespace of node ``node`` (``n1``...)."""
    return f"{cluster_network(slurm_conf)['SULIS_SLURM_NETNS_PREFIX']}-{node}"


def set_link(slurm_conf: str, node: str, state: str) -> None:
    """``up`` or ``down``: the switch's port of ``node`` (a network partition),
    by ``cluster.sh link``, which also has the node register again when it
    comes back up."""
    subprocess.run(["bash", str(CLUSTER_SH), "link", node, state],
                   env={**os.environ, "SULIS_SLURM_DIR": str(Path(slurm_conf).parent)},
                   check=True, capture_output=True, timeout=30)


def job_env(slurm_conf: str, marker: str, **extra: str) -> dict[str, str]:
    """The environment for sbatch: ours (already stripped of SLURM_* by the
    root conftest), this repository importable, Dask on each node's own
    interface (:data:`NODE_INTERFACE`), and a unique marker every process of
    the job inherits (see :func:`job_processes`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_"))}
    paths = [str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(
        SLURM_CONF=slurm_conf,
        PYTHONPATH=os.pathsep.join(paths),
        PYTHON=sys.executable,
        EXAMPLES_DIR=str(EXAMPLES),
        SULIS_EXECUTOR_INTERFACE=NODE_INTERFACE,
        SULIS_TEST_MARKER=marker,
        PYTHONUNBUFFERED="1",
        # MPICH's OFI netmod over TCP, not UCX: UCX's business cards, which
        # every rank puts through PMI at MPI_Init, are long enough to hit
        # SLURM's PMI-1 misparse (see PMI2_MISPARSE) in most runs of some
        # jobs, some of them hanging in MPI_Init; OFI's are short.
        MPIR_CVAR_CH4_NETMOD="ofi",
        FI_PROVIDER="tcp",
    )
    env.update(extra)
    return env


#: slurmstepd's complaint when it misparses a PMI-1 request from MPICH.
#: SLURM 22.05's mpi/pmi2 plugin reads a PMI-1 client's socket with a single
#: read(2) and parses it as one request; MPICH 5 sends its start-up
#: allgather as several ``cmd=put`` lines without waiting for replies, so on
#: a loaded machine one read can end in the middle of a line and MPI_Init
#: fails in every rank. It happens before any of our code runs; see
#: :func:`wait_for_mpi_job`.
PMI2_MISPARSE = "mpi/pmi2: value not properly terminated"


@dataclasses.dataclass
class Job:
    job_id: str
    output: Path
    marker: str
    env: dict[str, str]
    fields: dict[str, str] = dataclasses.field(default_factory=dict)
    resubmit_args: tuple[object, ...] = ()

    @property
    def state(self) -> str:
        return self.fields.get("JobState", "?")

    @property
    def exit_code(self) -> str:
        return self.fields.get("ExitCode", "?")

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def describe(self) -> str:
        return (f"job {self.job_id}: JobState={self.state} ExitCode={self.exit_code}\n"
                f"--- output ({self.output}) ---\n{self.text()}")


def submit(script: Path, tmp_path: Path, slurm_conf: str, *options: str,
           env: Mapping[str, str] | None = None, output_name: str = "job.out") -> Job:
    """``sbatch`` ``script`` (an example's batch script) with ``options``
    overriding its #SBATCH lines, from the examples directory (so
    SLURM_SUBMIT_DIR finds the Python scripts) but running in ``tmp_path``."""
    marker = f"sulis-test-{uuid.uuid4().hex}"
    job_environ = job_env(slurm_conf, marker, **dict(env or {}))
    output = tmp_path / output_name
    result = subprocess.run(
        slurm_command(slurm_conf, "sbatch", "--parsable", f"--output={output}",
                      f"--chdir={tmp_path}", f"--job-name={marker}", *options, str(script)),
        cwd=EXAMPLES, env=job_environ, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, f"sbatch failed: {result.stderr}"
    return Job(result.stdout.strip().split(";")[0], output, marker, job_environ,
               resubmit_args=(script, tmp_path, slurm_conf, options, dict(env or {})))


def scancel(job: Job, *options: str, check: bool = False) -> None:
    subprocess.run(slurm_command(job.env["SLURM_CONF"], "scancel", *options, job.job_id),
                   env=job.env, timeout=30, check=check)


def scontrol_fields(job_id: str, env: Mapping[str, str]) -> dict[str, str]:
    result = subprocess.run(slurm_command(env["SLURM_CONF"], "scontrol", "-o", "show", "job", job_id),
                            env=dict(env), capture_output=True, text=True, timeout=30)
    fields: dict[str, str] = {}
    for item in result.stdout.split():
        key, sep, value = item.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def poll_job(job: Job, check: Callable[[], T | None], what: str, timeout: float,
             interval: float = 0.25) -> T:
    """Call ``check`` until it returns something other than ``None``, and
    return that; after ``timeout``, cancel the job (so it cannot linger) and
    fail, saying ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            scancel(job)
            raise AssertionError(f"{what} within {timeout:g} s; cancelled the job.\n{job.describe()}")
        time.sleep(interval)


def wait_for_job(job: Job, timeout: float = 120.0) -> Job:
    """Poll ``scontrol show job`` (no accounting here, so no sacct) until
    the job is in a final state; cancel it and fail after ``timeout``."""

    def finished() -> Job | None:
        job.fields = scontrol_fields(job.job_id, job.env)
        return job if job.state in FINAL_STATES else None

    return poll_job(job, finished, "job did not finish", timeout)


def wait_for_mpi_job(job: Job, timeout: float = 120.0, attempts: int = 3) -> Job:
    """:func:`wait_for_job`, resubmitting (at most ``attempts`` runs in all)
    only when MPI_Init failed on SLURM's PMI race (:data:`PMI2_MISPARSE`),
    a fault of the test cluster's SLURM/MPICH pair, not of this project."""
    for attempt in range(1, attempts + 1):
        job = wait_for_job(job, timeout)
        if PMI2_MISPARSE not in job.text() or attempt == attempts:
            return job
        print(f"job {job.job_id} hit SLURM's PMI-1 misparse; resubmitting "
              f"(attempt {attempt + 1} of {attempts})")
        assert_no_processes_left(job)
        script, tmp_path, slurm_conf, options, env = job.resubmit_args
        job = submit(script, tmp_path, slurm_conf, *options, env=env,  # type: ignore[arg-type]
                     output_name=f"job-retry{attempt}.out")
    return job


def job_processes(marker: str) -> list[str]:
    """Command lines of processes whose environment holds ``marker``: every
    process a job started (batch script, scheduler, srun, workers, ranks)."""
    needle = f"SULIS_TEST_MARKER={marker}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue  # gone already, or not ours
    return found


def assert_no_processes_left(job: Job, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while left := job_processes(job.marker):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of job {job.job_id} still running "
                                 f"{timeout:g} s after it ended: {left}")
        time.sleep(0.2)


def result_line(job: Job) -> dict[str, object]:
    lines = [line for line in job.text().splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, f"expected one RESULT line.\n{job.describe()}"
    parsed: dict[str, object] = json.loads(lines[0][len("RESULT "):])
    return parsed


def assert_clean_success(job: Job) -> None:
    assert job.state == "COMPLETED" and job.exit_code == "0:0", job.describe()
    assert "Traceback" not in job.text(), job.describe()


def finished_cleanly(job: Job, timeout: float = 150.0,
                     wait: Callable[[Job, float], Job] = wait_for_job) -> Job:
    """Wait for ``job``: it must complete with status 0, print no traceback,
    and leave no process behind."""
    wait(job, timeout)
    assert_clean_success(job)
    assert_no_processes_left(job)
    return job
