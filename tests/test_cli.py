"""The ``sulis-executor`` command, run as ``python -m sulis_executor`` in
subprocesses with environments built here (the root conftest strips SLURM_*,
PMI_* and friends from ours, so nothing leaks in from the shell)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sulis_executor._template import (
    DEFAULT_TASKS_PER_NODE,
    NodeSize,
    node_size_from_sinfo,
    tasks_per_node_choice,
)

REPO = Path(__file__).resolve().parents[1]
SLURM_ENV = REPO / "tests" / "data" / "slurm_env"
_STRIPPED = ("SLURM_", "SULIS_EXECUTOR_", "DASK_", "PMI_", "OMPI_", "MPICH_", "HYDRA_", "PMIX_")


def load_env_dump(name: str) -> dict[str, str]:
    """A captured SLURM environment (``KEY=value`` lines, ``#`` comments)."""
    env = {}
    for line in (SLURM_ENV / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def cli(*args: str, extra_env: dict[str, str] | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_STRIPPED)}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "sulis_executor", *args], env=env,
                          capture_output=True, text=True, check=False, timeout=timeout, cwd=REPO)


def cpus_usable() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        return os.cpu_count() or 1


# -- info ---------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_info_outside_slurm_text() -> None:
    result = cli("info")
    assert result.returncode == 0, result.stderr
    assert "launch mode: local" in result.stdout
    assert "SLURM_JOB_ID unset" in result.stdout
    assert f"a local cluster of {cpus_usable()} worker processes" in result.stdout
    assert "SLURM allocation:" not in result.stdout
    assert result.stderr == ""


@pytest.mark.timeout(60)
def test_info_outside_slurm_json() -> None:
    result = cli("info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["mode"] == "local"
    assert info["workers"] == cpus_usable()
    assert info["allocation"] is None
    assert info["tasks_set_aside"] == 0
    assert info["options"]["max_workers"] == {"value": None, "source": "default"}


@pytest.mark.timeout(60)
def test_info_local_honours_max_workers_option() -> None:
    result = cli("info", "--json", extra_env={"SULIS_EXECUTOR_MAX_WORKERS": "3"})
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["mode"] == "local" and info["workers"] == 3
    assert info["options"]["max_workers"]["source"] == "environment variable SULIS_EXECUTOR_MAX_WORKERS"
    text = cli("info", extra_env={"SULIS_EXECUTOR_MAX_WORKERS": "3"}).stdout
    assert "a local cluster of 3 worker processes (the max_workers option)" in text
    assert "SULIS_EXECUTOR_MAX_WORKERS" in text


@pytest.mark.timeout(60)
def test_info_in_batch_script_text_and_json() -> None:
    # sbatch -N 3 --ntasks-per-node=2 --cpus-per-task=2 --mem-per-cpu=500
    env = load_env_dump("batch_step_multinode.env")
    result = cli("info", extra_env=env)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "launch mode: srun" in text
    assert "job id:           14" in text
    assert "n1, n2, n3" in text
    assert "2 on each node (6 task(s) in all)" in text
    assert "cpus per task:    2" in text
    assert "1000 MiB (SLURM_MEM_PER_CPU=500 MiB x 2 CPU(s) per task); 950 MiB after 5% headroom" in text
    # 2 CPUs per task: 2 worker processes per task, each running one call.
    assert "workers:          12 (tasks set aside: 0)" in text
    assert "threads each:     1" in text
    assert "(2 per SLURM task: its CPUs)" in text

    info = json.loads(cli("info", "--json", extra_env=env).stdout)
    assert info["mode"] == "srun"
    alloc = info["allocation"]
    assert alloc["job_id"] == "14"
    assert alloc["nodes"] == ["n1", "n2", "n3"]
    assert alloc["tasks_per_node"] == [2, 2, 2]
    assert alloc["cpus_per_task"] == 2
    assert alloc["memory_per_task_mib"] == 1000
    assert alloc["memory_per_task_after_headroom_mib"] == 950
    assert info["workers"] == 12 and info["tasks_set_aside"] == 0
    assert info["threads_per_worker"] == 1
    assert info["memory_per_worker"] == "950 MiB"


@pytest.mark.timeout(60)
def test_info_memory_figures_match_the_brief_example() -> None:
    # SLURM_MEM_PER_CPU=3850 with 2 CPUs per task: 7700 MiB, 7315 after headroom.
    env = load_env_dump("batch_step_multinode.env") | {"SLURM_MEM_PER_CPU": "3850"}
    info = json.loads(cli("info", "--json", extra_env=env).stdout)
    assert info["allocation"]["memory_per_task_mib"] == 7700
    assert info["allocation"]["memory_per_task_after_headroom_mib"] == 7315


@pytest.mark.timeout(60)
def test_info_mem_per_node() -> None:
    # sbatch -N 2 --ntasks-per-node=2 --mem=1200: 600 MiB per task.
    info = json.loads(cli("info", "--json", extra_env=load_env_dump("batch_mem_per_node.env")).stdout)
    assert info["mode"] == "srun" and info["workers"] == 4
    assert info["allocation"]["memory_per_task_mib"] == 600
    assert info["allocation"]["memory_per_task_after_headroom_mib"] == 570
    assert "SLURM_MEM_PER_NODE=1200" in info["allocation"]["memory_source"]


@pytest.mark.timeout(60)
def test_info_under_mpi() -> None:
    env = load_env_dump("srun_step_multinode.env") | {"PMI_SIZE": "6", "PMI_RANK": "0"}
    result = cli("info", extra_env=env)
    assert result.returncode == 0, result.stderr
    assert "launch mode: mpi" in result.stdout
    assert "PMI_SIZE=6" in result.stdout
    assert "workers:          5 (tasks set aside: 1, rank 0)" in result.stdout
    info = json.loads(cli("info", "--json", extra_env=env).stdout)
    assert info["mode"] == "mpi"
    assert info["workers"] == 5 and info["tasks_set_aside"] == 1
    assert info["allocation"]["step_id"] == "0"


@pytest.mark.timeout(60)
def test_info_does_not_import_mpi4py_or_start_anything() -> None:
    code = (
        "import os, sys, json, io, contextlib\n"
        "from sulis_executor import cli\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    assert cli.main(['info', '--json']) == 0\n"
        "assert 'mpi4py' not in sys.modules, 'mpi4py imported'\n"
        "import threading\n"
        "print(json.loads(out.getvalue())['mode'], threading.active_count())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(_STRIPPED)}
    env |= load_env_dump("srun_step_multinode.env") | {"PMI_SIZE": "6", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    mode, threads = result.stdout.split()
    assert mode == "mpi" and threads == "1"


@pytest.mark.timeout(60)
def test_info_bad_slurm_variable_is_one_line_exit_2() -> None:
    env = load_env_dump("batch_step_multinode.env") | {"SLURM_CPUS_PER_TASK": "abc"}
    for args in (("info",), ("info", "--json")):
        result = cli(*args, extra_env=env)
        assert result.returncode == 2
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "SLURM_CPUS_PER_TASK" in lines[0] and "'abc'" in lines[0]
        assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_info_bad_option_variable_is_one_line_exit_2() -> None:
    result = cli("info", extra_env={"SULIS_EXECUTOR_TIMEOUT": "soon"})
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "SULIS_EXECUTOR_TIMEOUT" in result.stderr and "Traceback" not in result.stderr


# -- template -----------------------------------------------------------------

RESOURCES = ("--nodes", "2", "--ntasks-per-node", "32", "--cpus-per-task", "4",
             "--mem-per-cpu", "3850", "--time", "02:00:00", "--account", "su123",
             "--partition", "compute", "--job-name", "analysis")


def sbatch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


def check_bash_syntax(path: Path) -> None:
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["srun", "mpi", "scheduler-file"])
def test_template_sbatch_lines_and_syntax(mode: str, tmp_path: Path) -> None:
    out = tmp_path / "job.sbatch"
    result = cli("template", mode, *RESOURCES, "-o", str(out),
                 "my analysis.py", "--", "--input", "data.csv")
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert text.startswith("#!/bin/bash\n")
    assert os.access(out, os.X_OK)
    assert sbatch_lines(text) == [
        "#SBATCH --job-name=analysis",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=32",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem-per-cpu=3850",
        "#SBATCH --time=02:00:00",
        "#SBATCH --account=su123",
        "#SBATCH --partition=compute",
    ]
    # sbatch reads #SBATCH lines only before the first command.
    body = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    first_command = text.splitlines().index(body[0])
    assert all(not line.startswith("#SBATCH") for line in text.splitlines()[first_command:])
    check_bash_syntax(out)
    assert "'my analysis.py' --input data.csv" in text
    assert "dask-scheduler" not in text and "dask-worker" not in text


@pytest.mark.timeout(60)
def test_template_srun_runs_python_directly() -> None:
    result = cli("template", "srun", "run.py")
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines()
                if line.strip() and not line.startswith("#")]
    assert commands[-1] == '"$PYTHON" run.py'
    assert not any(line.startswith("srun") for line in commands)
    assert "#SBATCH --job-name=run" in result.stdout


SULIS_LIKE_SINFO = """\
compute* 128
compute* 128
hmem 128
gpu 48
gpu 48
devel 64
devel 128
"""


def test_node_size_is_the_default_partitions_cpus_per_node() -> None:
    assert node_size_from_sinfo(SULIS_LIKE_SINFO, None) == NodeSize("compute", 128, 128)


def test_node_size_of_a_named_partition() -> None:
    assert node_size_from_sinfo(SULIS_LIKE_SINFO, "gpu") == NodeSize("gpu", 48, 48)


def test_node_size_of_a_mixed_partition_is_its_smallest_node_so_every_node_fits() -> None:
    assert node_size_from_sinfo(SULIS_LIKE_SINFO, "devel") == NodeSize("devel", 64, 128)


def test_node_size_without_a_default_partition_spans_every_node() -> None:
    assert node_size_from_sinfo("a 16\nb 8\n", None) == NodeSize("a,b", 8, 16)


def test_node_size_of_an_unknown_partition_or_no_output_is_none() -> None:
    assert node_size_from_sinfo(SULIS_LIKE_SINFO, "nosuch") is None
    assert node_size_from_sinfo("", None) is None


def test_tasks_per_node_fill_whole_nodes_and_say_so() -> None:
    tasks, said = tasks_per_node_choice(NodeSize("compute", 128, 128), cpus_per_task=4)
    assert tasks == 32
    assert "128 CPUs per node" in said and "compute" in said and "--cpus-per-task=4" in said
    tasks, said = tasks_per_node_choice(NodeSize("devel", 64, 128), cpus_per_task=1)
    assert tasks == 64 and "others have 128" in said


def test_tasks_per_node_without_slurm_is_the_default_and_says_why() -> None:
    tasks, said = tasks_per_node_choice(None, cpus_per_task=1, why_not="no SLURM here")
    assert tasks == DEFAULT_TASKS_PER_NODE
    assert "default" in said and "no SLURM here" in said and "--ntasks-per-node" in said


@pytest.mark.timeout(60)
def test_template_without_slurm_says_which_default_it_used(tmp_path: Path) -> None:
    # No sinfo on PATH: the machine cannot tell the node size.
    result = cli("template", "srun", "run.py", extra_env={"PATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert f"#SBATCH --ntasks-per-node={DEFAULT_TASKS_PER_NODE}" in result.stdout
    assert result.stderr.count("\n") == 1
    assert "the default" in result.stderr and "sinfo not found" in result.stderr


@pytest.mark.timeout(60)
def test_template_with_tasks_per_node_given_asks_nobody() -> None:
    result = cli("template", "srun", "run.py", "--ntasks-per-node", "7")
    assert result.returncode == 0 and result.stderr == ""
    assert "#SBATCH --ntasks-per-node=7" in result.stdout


@pytest.mark.timeout(60)
def test_template_mpi_uses_srun_pmi2_kill_on_bad_exit() -> None:
    result = cli("template", "mpi", "run.py", "--nodes", "3", "--ntasks-per-node", "2")
    assert result.returncode == 0, result.stderr
    assert 'srun --mpi="${SRUN_MPI:-pmi2}" --kill-on-bad-exit=1 "$PYTHON" run.py' in result.stdout
    assert "5 of them" in result.stdout  # 6 ranks, rank 0 set aside


@pytest.mark.timeout(60)
def test_template_mpi_needs_two_tasks() -> None:
    result = cli("template", "mpi", "run.py", "--ntasks-per-node", "1")
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "2 tasks" in result.stderr


@pytest.mark.timeout(60)
def test_template_scheduler_file_uses_dask_commands() -> None:
    result = cli("template", "scheduler-file", "run.py")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert '"$PYTHON" -m dask scheduler --scheduler-file "$SCHEDULER_FILE"' in text
    assert 'srun --overlap --kill-on-bad-exit=0 "$PYTHON" -m dask worker' in text
    assert "export SULIS_EXECUTOR_SCHEDULER_FILE=$SCHEDULER_FILE" in text
    assert "dask-scheduler" not in text and "dask-worker" not in text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, word", [
    (("--time", "two hours"), "--time"),
    (("--mem-per-cpu", "lots"), "--mem-per-cpu"),
    (("--partition", "a\nb"), "--partition"),
    (("--nodes", "0"), "--nodes"),
])
def test_template_rejects_bad_resources(args: tuple[str, ...], word: str) -> None:
    result = cli("template", "srun", "run.py", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert word in result.stderr and "Traceback" not in result.stderr


# -- help ---------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", [(), ("info",), ("demo",), ("template",)])
def test_help(command: tuple[str, ...]) -> None:
    result = cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: sulis-executor")
    if not command:
        for name in ("demo", "info", "template"):
            assert name in result.stdout
    else:
        assert len(result.stdout.splitlines()) > 5


@pytest.mark.timeout(60)
def test_no_command_is_a_usage_error() -> None:
    result = cli()
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_info_says_a_scheduler_named_by_dask_config_is_joined() -> None:
    info = json.loads(cli("info", "--json",
                          extra_env={"DASK_SCHEDULER_ADDRESS": "tcp://10.1.1.1:8786"}).stdout)
    assert info["mode"] == "attach"
    assert "scheduler-address=tcp://10.1.1.1:8786" in info["reason"]
    assert "tcp://10.1.1.1:8786" in info["cluster"]
    assert info["problems"] == []


@pytest.mark.timeout(60)
def test_template_resumable_signals_requeues_and_execs_python(tmp_path: Path) -> None:
    out = tmp_path / "job.sbatch"
    result = cli("template", "srun", "run.py", "--resumable", "-o", str(out))
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert sbatch_lines(text)[-2:] == ["#SBATCH --signal=B:USR1@120", "#SBATCH --requeue"]
    commands = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    # exec: Python becomes the batch shell, which SLURM signals (B:).
    assert commands[-2:] == ["export SULIS_EXECUTOR_JOURNAL=${SULIS_EXECUTOR_JOURNAL:-run.journal}",
                             'exec "$PYTHON" run.py']
    check_bash_syntax(out)
    plain = cli("template", "srun", "run.py")
    assert "--signal" not in plain.stdout and "exec " not in plain.stdout


@pytest.mark.timeout(60)
def test_template_resumable_is_for_srun_mode() -> None:
    result = cli("template", "mpi", "run.py", "--ntasks-per-node", "2", "--resumable")
    assert result.returncode != 0 and "--resumable is for srun mode" in result.stderr
