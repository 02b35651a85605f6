"""What SLURM allocated to us, parsed from the environment SLURM sets.

Pure functions only: callers pass the environment (usually ``os.environ``),
which keeps this module trivially testable against the real dumps in
``tests/data/slurm_env/`` (regenerate with ``tests/slurm/capture_env.sh``).

SLURM facts this relies on (checked against SLURM 22.05 dumps):

* The batch script runs in the *batch step*, which has no ``SLURM_STEP_ID``;
  every ``srun`` task has ``SLURM_STEP_ID`` (0, 1, ...).  The ``salloc`` shell
  runs on the submit host: no step id and no ``SLURMD_NODENAME``.
* Inside a step, ``SLURM_NODELIST`` is still the *job's* node list while
  ``SLURM_TASKS_PER_NODE``/``SLURM_NTASKS`` describe the *step*, so the layout
  must come from ``SLURM_STEP_NODELIST``/``SLURM_STEP_TASKS_PER_NODE`` there.
* Memory variables are in MiB (SLURM's "M"); only one of
  ``SLURM_MEM_PER_CPU`` / ``SLURM_MEM_PER_NODE`` is set.
* 22.05 exports no time limit; ``SLURM_JOB_START_TIME``/``SLURM_JOB_END_TIME``
  (Unix seconds) appear in newer releases and are used when present.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

__all__ = [
    "MEMORY_HEADROOM",
    "SlurmAllocation",
    "expand_hostlist",
    "expand_tasks_per_node",
]

#: Fraction of the SLURM memory allowance we hand to a worker.  SLURM kills a
#: step that exceeds its allowance, and a worker's own limit is only enforced
#: approximately (it is measured, not reserved), so leave 5% for the
#: interpreter, libraries and measurement lag.
MEMORY_HEADROOM = 0.95

_MIB = 1024 * 1024

# Step ids SLURM uses for steps that are not srun steps (names in newer
# releases, numbers -- SLURM_BATCH_SCRIPT / SLURM_EXTERN_CONT -- in older ones).
_BATCH_STEP_IDS = frozenset({"batch", "4294967294"})
_EXTERN_STEP_IDS = frozenset({"extern", "4294967295"})

# Where each variable comes from, for error messages that tell users what to fix.
_SOURCES = {
    "SLURM_CPUS_PER_TASK": "--cpus-per-task",
    "SLURM_MEM_PER_CPU": "--mem-per-cpu",
    "SLURM_MEM_PER_NODE": "--mem",
    "SLURM_NTASKS": "--ntasks",
    "SLURM_NPROCS": "--ntasks",
    "SLURM_STEP_NUM_TASKS": "srun --ntasks",
    "SLURM_NTASKS_PER_NODE": "--ntasks-per-node",
    "SLURM_TASKS_PER_NODE": "the job's task layout",
    "SLURM_STEP_TASKS_PER_NODE": "the step's task layout",
    "SLURM_JOB_NODELIST": "the job's node allocation",
    "SLURM_NODELIST": "the job's node allocation",
    "SLURM_STEP_NODELIST": "the step's node allocation",
}

T = TypeVar("T")


# --------------------------------------------------------------------------
# Syntax helpers
# --------------------------------------------------------------------------

def _split_top_level(s: str) -> list[str]:
    """Split on commas that are not inside ``[...]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError("nested '['")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError("']' without matching '['")
        elif ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    if depth:
        raise ValueError("'[' without matching ']'")
    parts.append(s[start:])
    return parts


def _expand_range_list(body: str) -> list[str]:
    """``"1-3,07"`` -> ``["1", "2", "3", "07"]``, keeping zero padding."""
    out: list[str] = []
    for item in body.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {item!r} in '[{body}]'")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r}")
        # SLURM pads to the width of the lower bound: n[01-10] -> n01..n10.
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return out


def expand_hostlist(s: str) -> list[str]:
    """Expand SLURM hostlist syntax into host names, in order.

    ``"n[1-3,7]"`` -> n1 n2 n3 n7; ``"gpu[01-02],login1"`` -> gpu01 gpu02
    login1 (zero padding kept); ``"a[1-2]b[3-4]"`` -> a1b3 a1b4 a2b3 a2b4.
    Raises ``ValueError`` on malformed input (unbalanced brackets, empty
    names, bad ranges).
    """
    hosts: list[str] = []
    for item in _split_top_level(s.strip()):
        if not item:
            raise ValueError("empty host name")
        # re.split with a capture group alternates literal, bracket body, ...
        pieces = re.split(r"\[([^\]]*)\]", item)
        choices = [
            _expand_range_list(p) if i % 2 else [p] for i, p in enumerate(pieces)
        ]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


_TASKS_ITEM = re.compile(r"(\d+)(?:\(x(\d+)\))?")


def expand_tasks_per_node(s: str) -> list[int]:
    """Expand SLURM's compressed count list: ``"2(x3),1"`` -> [2, 2, 2, 1].

    Used by ``SLURM_TASKS_PER_NODE`` and ``SLURM_JOB_CPUS_PER_NODE``.
    Raises ``ValueError`` on malformed input.
    """
    counts: list[int] = []
    for item in s.strip().split(","):
        m = _TASKS_ITEM.fullmatch(item)
        if not m:
            raise ValueError(f"bad item {item!r}")
        repeat = int(m.group(2) or 1)
        if repeat == 0:
            raise ValueError(f"zero repeat in {item!r}")
        counts.extend([int(m.group(1))] * repeat)
    return counts


# --------------------------------------------------------------------------
# Reading variables with useful errors
# --------------------------------------------------------------------------

def _bad(var: str, value: str, expected: str, detail: str = "") -> ValueError:
    source = _SOURCES.get(var)
    hint = f"; SLURM sets it from {source}" if source else ""
    why = f" ({detail})" if detail else ""
    return ValueError(
        f"{var}={value!r} is not {expected}{why}{hint} "
        "(unset it or fix the job script)"
    )


def _parse(env: Mapping[str, str], var: str, parse: Callable[[str], T], expected: str) -> T | None:
    """Parse ``env[var]`` (None when unset), naming var and value on failure."""
    value = env.get(var)
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as exc:
        raise _bad(var, value, expected, str(exc)) from None


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(s: str) -> int:
        if not s.strip().isdigit() or int(s) < minimum:
            raise ValueError("")
        return int(s)
    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    """First of ``names`` that is set."""
    return next((n for n in names if n in env), None)


def _parse_first(env: Mapping[str, str], names: tuple[str, ...], parse: Callable[[str], T], expected: str) -> T | None:
    var = _first(env, names)
    return None if var is None else _parse(env, var, parse, expected)


def _timestamp(s: str) -> float:
    return float(_non_negative(s))


# --------------------------------------------------------------------------
# The allocation
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class SlurmAllocation:
    """The SLURM job (and step) this process runs in.

    Fields:
        job_id: ``SLURM_JOB_ID``.
        step_id: ``SLURM_STEP_ID`` (None in the batch step / salloc shell).
        in_step: True inside an ``srun`` step (not the batch or extern step).
        is_batch_step: True in the batch script (runs on the first node).
        nodes: host names of the step (inside a step) or of the job.
        tasks_per_node: tasks on each of ``nodes``, same length.
        ntasks: total tasks of the step / job.
        cpus_per_task: ``SLURM_CPUS_PER_TASK``; 1 when absent (SLURM's default).
        memory_per_worker_raw: bytes SLURM grants one task, or None when the
            job did not ask for memory.  From ``SLURM_MEM_PER_CPU`` x
            ``cpus_per_task``, else ``SLURM_MEM_PER_NODE`` / tasks on this
            node -- this node being ``nodeid`` when known, otherwise the
            busiest node (the smallest share, so it is safe on every node).
            ``--mem=0`` ("all of the node's memory") gives None.
        memory_per_worker: ``memory_per_worker_raw`` x ``MEMORY_HEADROOM``
            (95%), the limit to give a worker so SLURM doesn't kill the step.
        procid, localid, nodeid: this task's global rank, rank on its node,
            and index of its node in ``nodes`` (None where SLURM doesn't say,
            e.g. in the salloc shell).
        node_name: ``SLURMD_NODENAME``, the SLURM node this runs on (can
            differ from the host name, e.g. several slurmd on one host).
        cpus_on_node: ``SLURM_CPUS_ON_NODE``, CPUs allocated on this node.
        gpus: GPU indices from ``SLURM_STEP_GPUS`` (in a step),
            ``SLURM_JOB_GPUS`` or ``CUDA_VISIBLE_DEVICES``; empty if none.
        start_time, end_time: Unix times (newer SLURM only; None in 22.05).
        time_limit_s: ``end_time - start_time`` when both are known.
        submit_host, partition, cluster_name: informational.
    """

    job_id: str
    step_id: str | None
    in_step: bool
    is_batch_step: bool
    nodes: tuple[str, ...]
    tasks_per_node: tuple[int, ...]
    ntasks: int
    cpus_per_task: int
    memory_per_worker_raw: int | None
    memory_per_worker: int | None
    procid: int | None
    localid: int | None
    nodeid: int | None
    node_name: str | None
    cpus_on_node: int | None
    gpus: tuple[str, ...]
    start_time: float | None
    end_time: float | None
    time_limit_s: int | None
    submit_host: str | None
    partition: str | None
    cluster_name: str | None

    @property
    def workers_per_node(self) -> dict[str, int]:
        """Node name -> number of tasks (one worker per task) on it, in order."""
        return dict(zip(self.nodes, self.tasks_per_node))

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> SlurmAllocation | None:
        """Parse ``environ``; None when not inside a SLURM job (no SLURM_JOB_ID).

        Raises ``ValueError`` naming the variable and its value when a SLURM
        variable is malformed or the layout is inconsistent.
        """
        env = environ
        job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        if not job_id:
            return None

        step_id = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
        is_batch_id = step_id in _BATCH_STEP_IDS
        in_step = step_id is not None and not is_batch_id and step_id not in _EXTERN_STEP_IDS
        # The salloc shell also lacks a step id, but runs outside slurmd, so
        # SLURMD_NODENAME is what tells it apart from the batch step.
        is_batch_step = is_batch_id or (step_id is None and "SLURMD_NODENAME" in env)

        # Inside a step, SLURM_NODELIST is the job's but SLURM_TASKS_PER_NODE
        # the step's: take both from the STEP_ variables (see module doc).
        step_prefix: tuple[str, ...] = ("SLURM_STEP_NODELIST",) if in_step else ()
        node_var = _first(env, step_prefix + ("SLURM_JOB_NODELIST", "SLURM_NODELIST"))
        if node_var is None:
            raise ValueError(
                f"SLURM_JOB_ID={job_id!r} is set but SLURM_JOB_NODELIST is not; "
                "is this a complete SLURM environment?"
            )
        nodes = _parse(env, node_var, expand_hostlist, "a SLURM hostlist like 'n[1-3,7],login1'")
        assert nodes is not None

        tasks_var = _first(
            env, (("SLURM_STEP_TASKS_PER_NODE",) if in_step else ()) + ("SLURM_TASKS_PER_NODE",)
        )
        if tasks_var is not None:
            tasks_per_node = _parse(env, tasks_var, expand_tasks_per_node, "a task count list like '2(x3),1'")
            assert tasks_per_node is not None
            if len(tasks_per_node) != len(nodes):
                raise ValueError(
                    f"{tasks_var}={env[tasks_var]!r} lists {len(tasks_per_node)} nodes "
                    f"but {node_var}={env[node_var]!r} has {len(nodes)}; "
                    "expected one count per node"
                )
        else:
            per_node = _parse(env, "SLURM_NTASKS_PER_NODE", _positive, "a positive integer")
            # Without any task layout SLURM runs one task per node (-N only).
            tasks_per_node = [per_node or 1] * len(nodes)

        ntasks = _parse_first(
            env,
            (("SLURM_STEP_NUM_TASKS",) if in_step else ()) + ("SLURM_NTASKS", "SLURM_NPROCS"),
            _positive,
            "a positive integer",
        )
        if ntasks is None:
            ntasks = sum(tasks_per_node)

        cpus_per_task = _parse(env, "SLURM_CPUS_PER_TASK", _positive, "a positive integer") or 1
        nodeid = _parse(env, "SLURM_NODEID", _non_negative, "a non-negative integer")
        if nodeid is not None and nodeid >= len(nodes):
            raise ValueError(
                f"SLURM_NODEID={env['SLURM_NODEID']!r} is not an index into "
                f"{node_var}={env[node_var]!r} ({len(nodes)} nodes)"
            )

        memory_raw = _memory_per_task(env, cpus_per_task, tasks_per_node, nodeid)

        start_time = _parse(env, "SLURM_JOB_START_TIME", _timestamp, "a Unix timestamp")
        end_time = _parse(env, "SLURM_JOB_END_TIME", _timestamp, "a Unix timestamp")
        time_limit_s = (
            int(end_time - start_time) if start_time is not None and end_time is not None else None
        )

        return cls(
            job_id=job_id,
            step_id=step_id,
            in_step=in_step,
            is_batch_step=is_batch_step,
            nodes=tuple(nodes),
            tasks_per_node=tuple(tasks_per_node),
            ntasks=ntasks,
            cpus_per_task=cpus_per_task,
            memory_per_worker_raw=memory_raw,
            memory_per_worker=None if memory_raw is None else int(memory_raw * MEMORY_HEADROOM),
            procid=_parse(env, "SLURM_PROCID", _non_negative, "a non-negative integer"),
            localid=_parse(env, "SLURM_LOCALID", _non_negative, "a non-negative integer"),
            nodeid=nodeid,
            node_name=env.get("SLURMD_NODENAME"),
            cpus_on_node=_parse(env, "SLURM_CPUS_ON_NODE", _positive, "a positive integer"),
            gpus=_gpus(env, in_step),
            start_time=start_time,
            end_time=end_time,
            time_limit_s=time_limit_s,
            submit_host=env.get("SLURM_SUBMIT_HOST"),
            partition=env.get("SLURM_JOB_PARTITION"),
            cluster_name=env.get("SLURM_CLUSTER_NAME"),
        )


def _memory_per_task(
    env: Mapping[str, str], cpus_per_task: int, tasks_per_node: list[int], nodeid: int | None
) -> int | None:
    """Bytes of SLURM memory allowance per task (before headroom), or None."""
    per_cpu = _parse(env, "SLURM_MEM_PER_CPU", _non_negative, "a memory size in MiB")
    if per_cpu:
        return per_cpu * cpus_per_task * _MIB
    per_node = _parse(env, "SLURM_MEM_PER_NODE", _non_negative, "a memory size in MiB")
    if per_node:  # 0 means "all the node's memory": size unknown here
        tasks_here = tasks_per_node[nodeid] if nodeid is not None else max(tasks_per_node)
        return per_node * _MIB // max(tasks_here, 1)
    return None


def _gpus(env: Mapping[str, str], in_step: bool) -> tuple[str, ...]:
    names = (("SLURM_STEP_GPUS",) if in_step else ()) + ("SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES")
    var = _first(env, names)
    value = "" if var is None else env[var].strip()
    # Old SLURM sets CUDA_VISIBLE_DEVICES=NoDevFiles for GPUs without device files.
    if value in ("", "NoDevFiles"):
        return ()
    return tuple(g.strip() for g in value.split(","))
