"""Specification of sulis_executor.slurm, checked against real SLURM dumps.

The ``tests/data/slurm_env/*.env`` files were captured from a real SLURM 22.05
cluster by ``tests/slurm/capture_env.sh``; the first line of each records the
command.  Job ids differ per capture, so they are compared with the dump itself.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from sulis_executor.slurm import (
    MEMORY_HEADROOM,
    SlurmAllocation,
    expand_hostlist,
    expand_tasks_per_node,
)

pytestmark = pytest.mark.timeout(10)

DUMPS = Path(__file__).parent / "data" / "slurm_env"
MiB = 1024 * 1024


def load_dump(name: str) -> dict[str, str]:
    lines = (DUMPS / f"{name}.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def parse(name: str) -> SlurmAllocation:
    alloc = SlurmAllocation.from_environ(load_dump(name))
    assert alloc is not None
    return alloc


# --- real environments -----------------------------------------------------

# name -> the fields we expect; anything not listed is checked elsewhere.
REAL_DUMPS = {
    "batch_step_multinode": dict(
        in_step=False, is_batch_step=True, step_id=None,
        nodes=("n1", "n2", "n3"), tasks_per_node=(2, 2, 2), ntasks=6, cpus_per_task=2,
        memory_per_worker_raw=2 * 500 * MiB,  # --mem-per-cpu=500 x -c 2
        procid=0, localid=0, nodeid=0, node_name="n1", cpus_on_node=4, gpus=(),
    ),
    "srun_step_multinode": dict(
        in_step=True, is_batch_step=False, step_id="0",
        nodes=("n1", "n2", "n3"), tasks_per_node=(2, 2, 2), ntasks=6, cpus_per_task=2,
        memory_per_worker_raw=2 * 500 * MiB,
        procid=0, localid=0, nodeid=0, node_name="n1", cpus_on_node=4, gpus=(),
    ),
    "srun_step_multinode_task3": dict(
        in_step=True, is_batch_step=False, step_id="0",
        nodes=("n1", "n2", "n3"), tasks_per_node=(2, 2, 2), ntasks=6, cpus_per_task=2,
        memory_per_worker_raw=2 * 500 * MiB,
        procid=3, localid=1, nodeid=1, node_name="n2", cpus_on_node=4,
    ),
    # srun -N 2 -n 3 inside a 3-node job: the layout is the step's, not the job's.
    "srun_step_subset": dict(
        in_step=True, nodes=("n1", "n2"), tasks_per_node=(2, 1), ntasks=3,
        procid=2, localid=0, nodeid=1, node_name="n2",
    ),
    "batch_no_cpus_per_task": dict(
        is_batch_step=True, nodes=("n1", "n2"), tasks_per_node=(2, 1), ntasks=3,
        cpus_per_task=1, memory_per_worker_raw=None, memory_per_worker=None, cpus_on_node=2,
    ),
    # --mem=1200 per node shared by this node's 2 tasks.
    "batch_mem_per_node": dict(
        nodes=("n1", "n2"), tasks_per_node=(2, 2), ntasks=4, cpus_per_task=1,
        memory_per_worker_raw=600 * MiB,
    ),
    "salloc": dict(
        in_step=False, is_batch_step=False, step_id=None,
        nodes=("n1", "n2"), tasks_per_node=(1, 1), ntasks=2, cpus_per_task=1,
        procid=None, localid=None, nodeid=None, node_name=None, cpus_on_node=None,
    ),
    # SLURM 22.05 exports no time limit or end time at all.
    "batch_time_limit": dict(
        nodes=("n1",), tasks_per_node=(1,), ntasks=1,
        time_limit_s=None, end_time=None, start_time=None,
    ),
    "batch_gpus": dict(is_batch_step=True, tasks_per_node=(2,), gpus=("0", "1")),
    "srun_step_gpus": dict(in_step=True, tasks_per_node=(2,), gpus=("0", "1")),
}


@pytest.mark.parametrize("name", sorted(REAL_DUMPS))
def test_real_slurm_environment_parses_to_expected_allocation(name: str) -> None:
    alloc = parse(name)
    actual = {field: getattr(alloc, field) for field in REAL_DUMPS[name]}
    assert actual == REAL_DUMPS[name]


def test_every_committed_dump_has_an_expectation() -> None:
    assert sorted(p.stem for p in DUMPS.glob("*.env")) == sorted(REAL_DUMPS)


@pytest.mark.parametrize("name", sorted(REAL_DUMPS))
def test_every_real_dump_records_how_it_was_captured(name: str) -> None:
    first = (DUMPS / f"{name}.env").read_text().splitlines()[0]
    assert first.startswith("# captured from: ")


@pytest.mark.parametrize("name", sorted(REAL_DUMPS))
def test_job_metadata_comes_from_the_environment(name: str) -> None:
    env = load_dump(name)
    alloc = parse(name)
    assert alloc.job_id == env["SLURM_JOB_ID"]
    assert (alloc.partition, alloc.cluster_name, alloc.submit_host) == (
        "debug", "sulis-test", env["SLURM_SUBMIT_HOST"],
    )


@pytest.mark.parametrize("name", sorted(REAL_DUMPS))
def test_tasks_per_node_always_matches_nodes_and_sums_to_ntasks(name: str) -> None:
    alloc = parse(name)
    assert len(alloc.tasks_per_node) == len(alloc.nodes)
    assert sum(alloc.tasks_per_node) == alloc.ntasks


def test_memory_per_worker_keeps_five_percent_headroom() -> None:
    alloc = parse("batch_step_multinode")
    assert MEMORY_HEADROOM == 0.95
    assert alloc.memory_per_worker == int(1000 * MiB * 0.95)


def test_workers_per_node_maps_each_node_to_its_task_count() -> None:
    assert parse("batch_no_cpus_per_task").workers_per_node == {"n1": 2, "n2": 1}


# --- synthetic environments (behaviour the real dumps don't exercise) -------

def test_outside_slurm_there_is_no_allocation() -> None:
    assert SlurmAllocation.from_environ({}) is None
    assert SlurmAllocation.from_environ({"HOME": "/root", "SLURM_CONF": "/x"}) is None


def minimal(**extra: str) -> dict[str, str]:
    return {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[1-2]", **extra}


def test_without_task_layout_slurm_runs_one_task_per_node() -> None:
    alloc = SlurmAllocation.from_environ(minimal())
    assert alloc is not None
    assert (alloc.tasks_per_node, alloc.ntasks, alloc.cpus_per_task) == ((1, 1), 2, 1)


def test_ntasks_per_node_is_used_when_tasks_per_node_is_absent() -> None:
    alloc = SlurmAllocation.from_environ(minimal(SLURM_NTASKS_PER_NODE="3"))
    assert alloc is not None and alloc.tasks_per_node == (3, 3)


def test_node_list_falls_back_to_slurm_nodelist() -> None:
    alloc = SlurmAllocation.from_environ({"SLURM_JOB_ID": "1", "SLURM_NODELIST": "a,b"})
    assert alloc is not None and alloc.nodes == ("a", "b")


def test_mem_per_node_without_nodeid_uses_the_busiest_node() -> None:
    env = minimal(SLURM_TASKS_PER_NODE="3,1", SLURM_MEM_PER_NODE="1200")
    alloc = SlurmAllocation.from_environ(env)
    assert alloc is not None and alloc.memory_per_worker_raw == 400 * MiB


def test_mem_per_node_uses_the_task_count_of_this_node() -> None:
    env = minimal(SLURM_TASKS_PER_NODE="3,1", SLURM_MEM_PER_NODE="1200", SLURM_NODEID="1")
    alloc = SlurmAllocation.from_environ(env)
    assert alloc is not None and alloc.memory_per_worker_raw == 1200 * MiB


def test_mem_zero_meaning_whole_node_gives_unknown_memory() -> None:
    alloc = SlurmAllocation.from_environ(minimal(SLURM_MEM_PER_NODE="0"))
    assert alloc is not None and alloc.memory_per_worker is None


def test_start_and_end_time_from_newer_slurm_give_the_time_limit() -> None:
    env = minimal(SLURM_JOB_START_TIME="1700000000", SLURM_JOB_END_TIME="1700000600")
    alloc = SlurmAllocation.from_environ(env)
    assert alloc is not None
    assert (alloc.start_time, alloc.end_time, alloc.time_limit_s) == (1700000000.0, 1700000600.0, 600)


@pytest.mark.parametrize("step_id", ["batch", "4294967294"])
def test_batch_step_ids_are_not_srun_steps(step_id: str) -> None:
    alloc = SlurmAllocation.from_environ(minimal(SLURM_STEP_ID=step_id))
    assert alloc is not None and (alloc.in_step, alloc.is_batch_step) == (False, True)


def test_cuda_visible_devices_is_the_last_resort_for_gpus() -> None:
    alloc = SlurmAllocation.from_environ(minimal(CUDA_VISIBLE_DEVICES="2,3"))
    assert alloc is not None and alloc.gpus == ("2", "3")


# --- syntax -----------------------------------------------------------------

@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("n1", ["n1"]),
        ("n[1-3,7]", ["n1", "n2", "n3", "n7"]),
        ("gpu[01-02],login1", ["gpu01", "gpu02", "login1"]),
        ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("x,y[1,3],z", ["x", "y1", "y3", "z"]),
        ("rack1-node[1-2]", ["rack1-node1", "rack1-node2"]),
    ],
)
def test_hostlist_expansion(hostlist: str, hosts: list[str]) -> None:
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["n[1-3", "n1-3]", "n[[1]]", "n[]", "n[a-b]", "n[3-1]", "n1,,n2", ""])
def test_malformed_hostlists_are_rejected(hostlist: str) -> None:
    with pytest.raises(ValueError):
        expand_hostlist(hostlist)


@pytest.mark.parametrize(
    "spec, counts",
    [("1", [1]), ("2(x3),1", [2, 2, 2, 1]), ("4,2(x2)", [4, 2, 2]), ("16(x1)", [16])],
)
def test_tasks_per_node_expansion(spec: str, counts: list[int]) -> None:
    assert expand_tasks_per_node(spec) == counts


@pytest.mark.parametrize("spec", ["2(x", "x3", "2(3)", "", "2,,1", "2(x0)", "-1"])
def test_malformed_tasks_per_node_is_rejected(spec: str) -> None:
    with pytest.raises(ValueError):
        expand_tasks_per_node(spec)


# --- errors name the variable, its value and what was expected ---------------

@pytest.mark.parametrize(
    "var, value, expected",
    [
        ("SLURM_CPUS_PER_TASK", "abc", "positive integer"),
        ("SLURM_CPUS_PER_TASK", "0", "positive integer"),
        ("SLURM_TASKS_PER_NODE", "2(x", "task count list"),
        ("SLURM_JOB_NODELIST", "n[1-2", "hostlist"),
        ("SLURM_NTASKS", "-3", "positive integer"),
        ("SLURM_MEM_PER_CPU", "1G", "memory size in MiB"),
        ("SLURM_NODEID", "first", "non-negative integer"),
        ("SLURM_CPUS_ON_NODE", "4.0", "positive integer"),
    ],
)
def test_garbage_value_error_names_variable_value_and_expectation(var: str, value: str, expected: str) -> None:
    with pytest.raises(ValueError) as info:
        SlurmAllocation.from_environ(minimal(**{var: value}))
    message = str(info.value)
    assert f"{var}={value!r}" in message
    assert expected in message


def test_garbage_cpus_per_task_error_says_how_to_fix_it() -> None:
    with pytest.raises(ValueError, match=r"SLURM sets it from --cpus-per-task \(unset it or fix the job script\)"):
        SlurmAllocation.from_environ(minimal(SLURM_CPUS_PER_TASK="abc"))


def test_tasks_per_node_that_disagrees_with_the_node_list_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"SLURM_TASKS_PER_NODE='2\(x3\)' lists 3 nodes.*has 2"):
        SlurmAllocation.from_environ(minimal(SLURM_TASKS_PER_NODE="2(x3)"))


def test_nodeid_outside_the_node_list_is_rejected() -> None:
    with pytest.raises(ValueError, match="SLURM_NODEID='5'"):
        SlurmAllocation.from_environ(minimal(SLURM_NODEID="5"))


def test_job_without_any_node_list_is_rejected() -> None:
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST is not"):
        SlurmAllocation.from_environ({"SLURM_JOB_ID": "7"})
