"""The ``sulis-executor`` command (also ``python -m sulis_executor``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._template import NodeSize

#: Exit status for a bad environment or bad arguments (as argparse uses).
USAGE_ERROR = 2


def _fail(command: str, error: BaseException) -> int:
    """One line on stderr naming the problem; no traceback."""
    message = " ".join(str(error).split())
    print(f"sulis-executor {command}: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def count_primes_below(n: int) -> int:
    """A small CPU-bound task for the demo: trial division, on purpose."""
    count = 0
    for candidate in range(2, n):
        if all(candidate % d for d in range(2, int(candidate**0.5) + 1)):
            count += 1
    return count


def _demo(args: argparse.Namespace) -> int:
    from . import SulisDaskExecutor

    inputs = [args.size + i for i in range(args.tasks)]
    started = time.perf_counter()
    with SulisDaskExecutor(max_workers=args.workers) as ex:
        ready = time.perf_counter()
        results = list(ex.map(count_primes_below, inputs))
        done = time.perf_counter()
        mode, workers = ex.launch_mode, ex.num_workers
    closed = time.perf_counter()
    print(f"cluster: {mode} mode, {workers} workers")
    for n, primes in list(zip(inputs, results))[: args.show]:
        print(f"  primes below {n}: {primes}")
    if len(results) > args.show:
        print(f"  ... and {len(results) - args.show} more")
    print(f"startup {ready - started:.2f} s, map {done - ready:.2f} s "
          f"({len(inputs) / (done - ready):.0f} tasks/s), shutdown {closed - done:.2f} s")
    return 0


def _info(args: argparse.Namespace) -> int:
    from ._info import describe_environment, format_info

    try:
        info = describe_environment(os.environ)
    except (ValueError, TypeError) as error:
        return _fail("info", error)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_info(info))
    return 0


def _node_size(partition: str | None) -> tuple[NodeSize | None, str]:
    """Ask this machine's SLURM (a login node's ``sinfo``) how big a node is;
    with a deadline, since a slurmctld that does not answer must not stall
    writing a file. The second value says why there is no answer."""
    import subprocess

    from ._template import SINFO_COMMAND, node_size_from_sinfo

    try:
        result = subprocess.run(SINFO_COMMAND, capture_output=True, text=True, timeout=15,
                                check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return None, "no SLURM here (sinfo not found)"
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"sinfo failed ({error})"
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"sinfo failed ({last})"
    size = node_size_from_sinfo(result.stdout, partition)
    if size is None:
        where = f"partition {partition!r}" if partition else "any partition"
        return None, f"sinfo lists no node in {where}"
    return size, ""


def _template(args: argparse.Namespace) -> int:
    from ._template import BatchResources, render_template, tasks_per_node_choice

    ntasks_per_node = args.ntasks_per_node
    if ntasks_per_node is None:
        size, why_not = _node_size(args.partition)
        ntasks_per_node, said = tasks_per_node_choice(size, args.cpus_per_task, why_not)
        print(f"sulis-executor template: {said}", file=sys.stderr)
    resources = BatchResources(
        nodes=args.nodes, ntasks_per_node=ntasks_per_node,
        cpus_per_task=args.cpus_per_task, mem_per_cpu=args.mem_per_cpu, time=args.time,
        account=args.account, partition=args.partition, job_name=args.job_name,
    )
    try:
        text = render_template(args.mode, args.script, resources, args.script_args,
                               resumable=args.resumable)
    except ValueError as error:
        return _fail("template", error)
    if args.output in (None, "-"):
        sys.stdout.write(text)
        return 0
    try:
        with open(args.output, "w") as out:
            out.write(text)
        os.chmod(args.output, 0o755 & ~_umask())
    except OSError as error:
        return _fail("template", error)
    print(f"wrote {args.output}; submit it with: sbatch {args.output}", file=sys.stderr)
    return 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FORMATTER = argparse.RawDescriptionHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sulis-executor",
        description="A drop-in concurrent.futures executor on Dask, for SLURM clusters and laptops.",
        epilog="Run 'sulis-executor COMMAND --help' for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    demo = commands.add_parser(
        "demo", help="run a small map on the default cluster and print results and timing",
        description="Map a small CPU-bound function over inputs with SulisDaskExecutor() "
                    "and print the results, throughput and startup time.",
    )
    demo.add_argument("--tasks", type=int, default=200, help="number of inputs (default 200)")
    demo.add_argument("--size", type=int, default=2000, help="work per task (default 2000)")
    demo.add_argument("--workers", type=int, default=None, help="local workers (default: CPUs)")
    demo.add_argument("--show", type=int, default=5, help="results to print (default 5)")
    demo.set_defaults(run=_demo)

    info = commands.add_parser(
        "info", help="show what SulisDaskExecutor() would do here, and why",
        formatter_class=_FORMATTER,
        description=(
            "Show which cluster SulisDaskExecutor() would use in this environment and why:\n"
            "the launch mode launch='auto' picks and its reason; inside a SLURM allocation,\n"
            "the parsed allocation (job id, nodes, tasks per node, CPUs per task, memory per\n"
            "task before and after the 5% headroom), the number of workers and their threads\n"
            "and memory, and the tasks set aside (srun: 0, mpi: 1); outside SLURM, the size\n"
            "of the local cluster. Options set through SULIS_EXECUTOR_* variables or the Dask\n"
            "config are shown with their source.\n\n"
            "Nothing is started. Run it where the script would run, e.g. in the batch script\n"
            "or under srun, to check a job before it spends its allocation. A malformed\n"
            "variable is reported in one line on stderr with exit status 2."
        ),
    )
    info.add_argument("--json", action="store_true", help="print the same information as JSON")
    info.set_defaults(run=_info)

    template = commands.add_parser(
        "template", help="write a batch script that runs a Python script in a chosen mode",
        formatter_class=_FORMATTER,
        description=(
            "Write a ready-to-submit SLURM batch script that runs SCRIPT (a Python script\n"
            "using SulisDaskExecutor) in one of three modes:\n\n"
            "  srun            python SCRIPT in the batch script; the executor starts a worker\n"
            "                  process per CPU of each task, none set aside (the default)\n"
            "  mpi             srun --mpi=pmi2 --kill-on-bad-exit=1 python SCRIPT; rank 0 runs\n"
            "                  the scheduler and the script, the other ranks are workers\n"
            "  scheduler-file  the batch script starts 'dask scheduler' and 'srun dask worker',\n"
            "                  and the executor attaches through the scheduler file\n\n"
            "Arguments after SCRIPT (after '--' if they start with '-') are passed to it.\n"
            "example: sulis-executor template srun analysis.py --nodes 2 --ntasks-per-node 32 \\\n"
            "             --cpus-per-task 4 --mem-per-cpu 3850 --time 02:00:00 -o job.sbatch"
        ),
    )
    template.add_argument("mode", choices=["srun", "mpi", "scheduler-file"], metavar="MODE",
                          help="srun, mpi or scheduler-file")
    template.add_argument("script", metavar="SCRIPT", help="the Python script the job runs")
    template.add_argument("script_args", nargs="*", metavar="ARG", help="arguments for SCRIPT")
    template.add_argument("-o", "--output", metavar="FILE",
                          help="write the script to FILE (made executable) instead of stdout")
    template.add_argument("--resumable", action="store_true",
                          help="srun mode: SIGUSR1 120 s before the limit, --requeue, exec "
                               "python, and the resume journal (docs/long_runs.rst)")
    resources = template.add_argument_group("resources (become #SBATCH lines)")
    resources.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    resources.add_argument("--ntasks-per-node", type=int, default=None,
                           help="tasks per node (default: whole nodes, the CPUs per node "
                                "sinfo reports over --cpus-per-task; 4 without SLURM)")
    resources.add_argument("--cpus-per-task", type=int, default=1,
                           help="CPUs per task: each runs a worker process (default 1)")
    resources.add_argument("--mem-per-cpu", metavar="MB", default=None,
                           help="memory per CPU in MiB, e.g. 3850 (default: the partition's)")
    resources.add_argument("--time", default="01:00:00",
                           help="wall-time limit, e.g. 02:00:00 (default 01:00:00)")
    resources.add_argument("--account", default=None, help="account to charge")
    resources.add_argument("--partition", default=None, help="partition to run in")
    resources.add_argument("--job-name", default=None,
                           help="job name (default: the script's name)")
    template.set_defaults(run=_template)

    journal = commands.add_parser(
        "journal", help="show how many calls a resume journal holds, or clear it",
        description="Show how many finished calls the resume journal PATH holds (see the "
                    "journal= option) and its size; --clear empties it, so the next run "
                    "runs every call again.",
    )
    journal.add_argument("path", metavar="PATH", help="the journal file")
    journal.add_argument("--clear", action="store_true", help="empty the journal")
    journal.set_defaults(run=_journal_command)
    return parser


def _journal_command(args: argparse.Namespace) -> int:
    from ._journal import NotAJournalError, clear, inspect

    try:
        if args.clear:
            calls, size, _ = inspect(args.path)
            clear(args.path)
            print(f"{args.path}: cleared ({calls} calls, {size} bytes removed)")
            return 0
        calls, size, torn = inspect(args.path)
    except (NotAJournalError, OSError) as error:
        print(f"sulis-executor journal: {error}", file=sys.stderr)
        return 2
    note = f"; a torn last record of {torn} bytes, ignored" if torn else ""
    print(f"{args.path}: {calls} calls, {size} bytes{note}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
