"""The ``sulis-executor`` command (also ``python -m sulis_executor``)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sulis-executor",
        description="A drop-in concurrent.futures executor on Dask, for SLURM clusters and laptops.",
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
