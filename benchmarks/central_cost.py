"""The central process's CPU time per batch (``s`` in docs/scaling.rst).

    python -m benchmarks.central_cost [--members 16 64] [--batches 2000] [--repeats 3]

The scheduler, the executor's engine and the script share one process, so
its CPU time per batch bounds how many batches a second one cluster can
run. Each measurement, in a fresh process: a local cluster of ``members``
worker processes, then ``map(sleep_for, [0.025] * batches, chunksize=1)``,
one call to a batch (a chunk taking 20 ms or more goes on its own), and the
CPU time of the executor's process over the map (every thread of it:
``time.process_time``) divided by the batches. The 25 ms calls keep the
members busy without being the measurement: they run in other processes.

Writes ``benchmarks/results/central_cost.md`` (median and min-max over the
repeats, with the commit). On a 2-core machine the members compete with
the central process for the cores, so read the order of magnitude.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import checkout_commit

REPO = Path(__file__).resolve().parents[1]
CALL_SECONDS = 0.025
MARKER = "CENTRAL_COST "


def measure(members: int, batches: int) -> dict[str, float]:
    """Run in the child: one map, its CPU time per batch."""
    from benchmarks.tasks import sleep_for
    from sulis_executor import SulisDaskExecutor

    with SulisDaskExecutor(max_workers=members) as ex:
        list(ex.map(sleep_for, [0.001] * (2 * members), chunksize=1))  # every member warm
        cpu, wall = time.process_time(), time.perf_counter()
        results = list(ex.map(sleep_for, [CALL_SECONDS] * batches, chunksize=1))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert results == [CALL_SECONDS] * batches
    return {"members": members, "batches": batches, "cpu_s": cpu, "wall_s": wall,
            "ms_per_batch": 1000 * cpu / batches}


def _child(members: int, batches: int) -> dict[str, float]:
    code = (f"import json; from benchmarks.central_cost import measure, MARKER; "
            f"print(MARKER + json.dumps(measure({members}, {batches})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=600, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith(MARKER))
    return json.loads(line[len(MARKER):])


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} ({min(values):.3g}–{max(values):.3g})"


def report(rows: list[dict[str, float]], commit: str, repeats: int) -> str:
    lines = [
        "# Central CPU time per batch (local cluster, one machine)",
        "",
        f"- commit `{commit}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{os.cpu_count()} CPUs; {repeats} repeats, each in a fresh process; "
        "median (min–max)",
        f"- `map(sleep_for, [{CALL_SECONDS}] * batches, chunksize=1)`: one call per batch; "
        "CPU time of the executor's process (scheduler, engine, script) over the map",
        "",
        "| members | batches | ms of central CPU per batch | central CPU (s) | wall (s) |",
        "|---|---|---|---|---|",
    ]
    for members in sorted({r["members"] for r in rows}):
        mine = [r for r in rows if r["members"] == members]
        lines.append(f"| {members} | {mine[0]['batches']:,.0f} | "
                     f"{_cell([r['ms_per_batch'] for r in mine])} | "
                     f"{_cell([r['cpu_s'] for r in mine])} | {_cell([r['wall_s'] for r in mine])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.central_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    rows = [_child(members, args.batches)
            for _ in range(args.repeats) for members in args.members]  # interleaved
    table = report(rows, checkout_commit(), args.repeats)
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, "central_cost.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
