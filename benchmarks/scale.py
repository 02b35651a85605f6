"""The executor at scale, side by side with ``ProcessPoolExecutor``.

    python -m benchmarks.scale             # full: local 8, 32, 128 against PPE;
                                           #   srun on 3x2, 8x4, 16x8 and 1x128
    python -m benchmarks.scale --quick     # the CI variant: smaller sizes, fewer shapes
    python -m benchmarks.scale --local     # local only (or --srun: srun only)
    python -m benchmarks.scale --shapes 128,16x8   # only these sizes (local n, srun NxC)
    python -m benchmarks.scale --repeats 5         # runs per cell (3; quick: 1)

Every measurement runs in a fresh process (``--child``), as in
``benchmarks.run``. Local mode: ``SulisDaskExecutor(max_workers=n)`` and
``ProcessPoolExecutor(n)`` on this machine. srun mode: a SLURM test cluster
of the shape's nodes and CPUs (``tests/slurm/cluster.sh``, started for the
run in a directory and on ports of its own, and stopped after), and a batch
job with one task per CPU (``--cpus-per-task=1 --mem-per-cpu=600``) whose
script is a plain ``python`` running the same measurements.

Per run: **ready** (constructor, then one trivial call per worker, all
collected), a **map** of ``inc`` over 1M items (PPE with ``chunksize =
N / (4 n)``), **sleep efficiency** (10 calls of 50 ms per worker; ideal time
over actual), **submits** (20,000 ``submit(inc)``, then every result), and
**shutdown** (``shutdown(wait=True)``). Each child also checks its results,
and the driver checks that it wrote nothing to stderr and left no process
behind (every process the run started carries a marker in its environment).
**Idle cost**: the CPU that the executor's processes (client, scheduler,
workers, fork servers) use over 10 s with nothing to do, as a fraction of
one core.

Each cell is the median of ``--repeats`` runs (the local pair interleaved,
ours then PPE, run after run; each srun run on a cluster started for it);
``scale.json`` keeps every run. Results go to ``benchmarks/results/scale.{json,md,png}`` (``--quick``:
``benchmarks/results/quick/``), with the commit. Timings are reported, never
asserted: these machines are noisy, and the targets are read off the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks import checkout_commit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
CLUSTER_SH = ROOT / "tests" / "slurm" / "cluster.sh"
MARKER_VARIABLE = "SULIS_SCALE_MARKER"
RESULT = "SCALE_RESULT "

FULL = {
    "local": [8, 32, 128],
    "srun": [(3, 2), (8, 4), (16, 8), (1, 128)],
    "map_items": 1_000_000,
    "sleeps_per_worker": 10,
    "submits": 20_000,
    "idle_seconds": 10.0,
}
QUICK = {
    "local": [8, 32],
    "srun": [(3, 2), (2, 4)],
    "map_items": 100_000,
    "sleeps_per_worker": 5,
    "submits": 5_000,
    "idle_seconds": 3.0,
}
SLEEP = 0.05


# -- one measurement (in a fresh process) -------------------------------------


def inc(x: int) -> int:
    return x + 1


def ident(x: int) -> int:
    return x


def sleep_then_return(x: int) -> int:
    time.sleep(SLEEP)  # stands for work
    return x


def _executor(kind: str, workers: int):
    if kind == "ppe":
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(workers)
    from sulis_executor import SulisDaskExecutor

    return SulisDaskExecutor(max_workers=workers or None)


def _cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def marked_processes(marker: str) -> list[int]:
    """Pids of the processes whose environment holds ``marker``."""
    needle = f"{MARKER_VARIABLE}={marker}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def measure(kind: str, workers: int, sizes: dict[str, float]) -> dict[str, float]:
    """Run every measurement on one executor; return them."""
    record: dict[str, float] = {}
    started = time.perf_counter()
    ex = _executor(kind, workers)
    n = workers or ex.num_workers  # srun: the allocation's tasks
    assert list(ex.map(ident, range(n))) == list(range(n))
    record["ready_s"] = time.perf_counter() - started
    record["workers"] = n
    if kind != "ppe":
        record["workers_seen"] = ex.num_workers

    items = int(sizes["map_items"])
    started = time.perf_counter()
    if kind == "ppe":
        total = sum(ex.map(inc, range(items), chunksize=max(1, items // (4 * n))))
    else:
        total = sum(ex.map(inc, range(items)))
    assert total == items * (items + 1) // 2
    record["map_items_per_s"] = items / (time.perf_counter() - started)

    calls = int(sizes["sleeps_per_worker"]) * n
    started = time.perf_counter()
    assert list(ex.map(sleep_then_return, range(calls))) == list(range(calls))
    record["sleep_efficiency"] = (calls * SLEEP / n) / (time.perf_counter() - started)

    submits = int(sizes["submits"])
    started = time.perf_counter()
    futures = [ex.submit(inc, i) for i in range(submits)]
    assert [f.result() for f in futures] == list(range(1, submits + 1))
    record["submits_per_s"] = submits / (time.perf_counter() - started)
    del futures

    marker = os.environ.get(MARKER_VARIABLE)
    if sizes.get("idle_seconds") and marker:
        time.sleep(1.0)  # let the last work's traffic settle
        pids = marked_processes(marker) + [os.getpid()]
        before = _cpu_seconds(pids)
        time.sleep(sizes["idle_seconds"])
        record["idle_cores"] = (_cpu_seconds(pids) - before) / sizes["idle_seconds"]
        record["idle_processes"] = len(pids)

    started = time.perf_counter()
    ex.shutdown(wait=True)
    record["shutdown_s"] = time.perf_counter() - started
    return record


def child(kind: str, workers: int, sizes: dict[str, float]) -> None:
    try:
        record = measure(kind, workers, sizes)
    except BaseException as error:  # reported, not raised: the driver goes on
        record = {"error": f"{type(error).__name__}: {error}"}
    print(RESULT + json.dumps(record), flush=True)


# -- the driver ----------------------------------------------------------------


def _parse_result(text: str) -> dict[str, object]:
    for line in text.splitlines():
        if line.startswith(RESULT):
            parsed: dict[str, object] = json.loads(line[len(RESULT):])
            return parsed
    return {"error": "no result line"}


def _left_behind(marker: str, grace: float = 10.0) -> list[int]:
    deadline = time.monotonic() + grace
    while (left := marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def median_record(records: list[dict[str, object]]) -> dict[str, object]:
    """One record standing for several runs of a cell: each figure's median.
    What any run reported as wrong is kept (its error, its stderr, the most
    processes it left behind), so a bad run cannot hide behind good ones."""
    if len(records) == 1:
        return records[0]
    merged: dict[str, object] = {}
    for key in sorted(set().union(*records)):
        values = [record[key] for record in records if key in record]
        if key == "stderr":
            merged[key] = "\n".join(str(v) for v in values if str(v).strip())
        elif key == "left_behind":
            merged[key] = max(values)  # type: ignore[type-var]
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            merged[key] = statistics.median_low(values)  # type: ignore[type-var]  # counts stay whole
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            merged[key] = statistics.median(values)  # type: ignore[type-var]
        else:
            merged[key] = values[0]
    return merged


def run_local(kind: str, workers: int, sizes: dict[str, float], timeout: float) -> dict[str, object]:
    marker = uuid.uuid4().hex
    env = dict(os.environ, **{MARKER_VARIABLE: marker}, PYTHONPATH=str(ROOT),
               SULIS_EXECUTOR_INTERFACE=os.environ.get("SULIS_EXECUTOR_INTERFACE", "lo"))
    command = [sys.executable, "-m", "benchmarks.scale", "--child", kind, str(workers),
               "--sizes", json.dumps(sizes)]
    try:
        proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        record = _parse_result(proc.stdout)
        record["stderr"] = proc.stderr[-2000:]
    except subprocess.TimeoutExpired as expired:
        record = {"error": f"timed out after {timeout:g} s", "stderr": str(expired.stderr or "")[-2000:]}
    left = _left_behind(marker)
    if left:
        record["left_behind"] = len(left)
        for pid in left:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
    return record


def _cluster_env(nodes: int, cpus: int) -> dict[str, str]:
    """A test cluster of its own for this shape (see tests/slurm/cluster.sh),
    beside the test suite's: its directory and ports can be moved with
    SULIS_SCALE_SLURM_DIR and SULIS_SCALE_SLURMCTLD_PORT / _SLURMD_PORT, so
    that two runs on one machine do not meet."""
    return dict(
        os.environ,
        SULIS_SLURM_DIR=f"{os.environ.get('SULIS_SCALE_SLURM_DIR', '/tmp/sulis-slurm-scale')}-{nodes}x{cpus}",
        SULIS_SLURM_NODES=str(nodes),
        SULIS_SLURM_CPUS=str(cpus),
        SULIS_SLURM_MEMORY=str(cpus * 700),
        SULIS_SLURMCTLD_PORT=os.environ.get("SULIS_SCALE_SLURMCTLD_PORT", "18817"),
        SULIS_SLURMD_PORT=os.environ.get("SULIS_SCALE_SLURMD_PORT", "18001"),
    )


JOB = """#!/bin/bash
exec "{python}" -m benchmarks.scale --child sulis 0 --sizes '{sizes}'
"""


def run_srun(nodes: int, cpus: int, sizes: dict[str, float], timeout: float, workdir: Path) -> dict[str, object]:
    cluster = _cluster_env(nodes, cpus)
    started = subprocess.run(["bash", str(CLUSTER_SH), "start"], env=cluster, capture_output=True,
                             text=True, timeout=600)
    if started.returncode != 0:
        return {"error": f"cluster.sh start failed: {started.stderr[-500:]}"}
    conf = re.search(r"export SLURM_CONF=(\S+)", started.stdout).group(1)  # type: ignore[union-attr]
    marker = uuid.uuid4().hex
    env = {k: v for k, v in cluster.items() if not k.startswith("SLURM_")}
    # Every node of the test cluster has a network of its own: eth0.
    env.update(SLURM_CONF=conf, PYTHONPATH=str(ROOT), **{MARKER_VARIABLE: marker},
               SULIS_EXECUTOR_INTERFACE=os.environ.get("SULIS_EXECUTOR_INTERFACE", "eth0"))
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / f"scale-{nodes}x{cpus}.sbatch"
    script.write_text(JOB.format(python=sys.executable, sizes=json.dumps(sizes)))
    out, err = workdir / f"scale-{nodes}x{cpus}.out", workdir / f"scale-{nodes}x{cpus}.err"
    try:
        job = subprocess.run(
            # In the test cluster's login namespace (see cluster.sh).
            ["bash", str(CLUSTER_SH), "run", "sbatch", "--parsable", "--wait", f"--nodes={nodes}",
             f"--ntasks-per-node={cpus}", "--cpus-per-task=1", "--mem-per-cpu=600", f"--output={out}", f"--error={err}",
             f"--chdir={ROOT}", f"--time={max(2, int(timeout // 60) + 1)}", str(script)],
            env=env, capture_output=True, text=True, timeout=timeout,
        )
        record = _parse_result(out.read_text() if out.exists() else "")
        record["stderr"] = (err.read_text() if err.exists() else "")[-2000:]
        if job.returncode != 0 and "error" not in record:
            record["error"] = f"job exited with {job.returncode}"
    except subprocess.TimeoutExpired:
        record = {"error": f"timed out after {timeout:g} s"}
    finally:
        left = _left_behind(marker)
        subprocess.run(["bash", str(CLUSTER_SH), "stop"], env=cluster, capture_output=True, timeout=120)
    if left:
        record["left_behind"] = len(left)
    return record


FIGURES = [
    ("ready_s", "ready, s", "{:.2f}"),
    ("map_items_per_s", "map items/s", "{:,.0f}"),
    ("sleep_efficiency", "sleep efficiency", "{:.3f}"),
    ("submits_per_s", "submits/s", "{:,.0f}"),
    ("shutdown_s", "shutdown, s", "{:.2f}"),
    ("idle_cores", "idle, cores", "{:.3f}"),
]


def _cell(record: dict[str, object] | None, key: str, form: str) -> str:
    if record is None:
        return "-"
    if "error" in record:
        return "error"
    value = record.get(key)
    return "-" if value is None else form.format(value)


def _flags(record: dict[str, object]) -> str:
    notes = []
    if record.get("error"):
        notes.append(f"error: {record['error']}")
    if str(record.get("stderr", "")).strip():
        notes.append("stderr not empty")
    if record.get("left_behind"):
        notes.append(f"{record['left_behind']} processes left behind")
    return "; ".join(notes) or "clean"


def _shape_order(item: tuple[str, object]) -> tuple[int, int]:
    """``"16x8"`` sorts by its workers, then its nodes."""
    nodes, cpus = map(int, item[0].split("x"))
    return nodes * cpus, nodes


def markdown(results: dict[str, object]) -> str:
    lines = [f"# Scale benchmark ({results['commit']}, {results['when']})", "",
             f"Each cell: the median of {results.get('repeats', 1)} run(s); "
             "`scale.json` has every run.", ""]
    local = results.get("local") or {}
    if local:
        lines += ["## Local mode: ours (ProcessPoolExecutor)", "",
                  "| n | " + " | ".join(label for _, label, _ in FIGURES) + " | ours: output and processes |",
                  "|---" * (len(FIGURES) + 2) + "|"]
        for n, pair in sorted(local.items(), key=lambda item: int(item[0])):  # type: ignore[union-attr]
            cells = [f"{_cell(pair['sulis'], k, f)} ({_cell(pair.get('ppe'), k, f)})" for k, _, f in FIGURES]
            lines.append(f"| {n} | " + " | ".join(cells) + f" | {_flags(pair['sulis'])} |")
        lines.append("")
    srun = results.get("srun") or {}
    if srun:
        lines += ["## srun mode (plain `python` in the batch script, --cpus-per-task=1)", "",
                  "| nodes x tasks | workers | " + " | ".join(label for _, label, _ in FIGURES) + " | output and processes |",
                  "|---" * (len(FIGURES) + 3) + "|"]
        for shape, record in sorted(srun.items(), key=_shape_order):  # type: ignore[union-attr]
            cells = [_cell(record, k, f) for k, _, f in FIGURES]
            lines.append(f"| {shape} | {record.get('workers_seen', '-')} | " + " | ".join(cells)
                         + f" | {_flags(record)} |")
        lines.append("")
    for name, text in (results.get("stderr") or {}).items():  # type: ignore[union-attr]
        lines += [f"stderr of {name}:", "", "```", str(text).strip(), "```", ""]
    return "\n".join(lines)


def plot(results: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, label, _) in zip(axes.flat, FIGURES):
        for name, series in (("ours, local", "local"), ("ours, srun", "srun")):
            points = []
            for record in (results.get(series) or {}).values():  # type: ignore[union-attr]
                record = record["sulis"] if series == "local" else record
                if "error" not in record and record.get(key) is not None:
                    points.append((record.get("workers_seen") or record["workers"], record[key]))
            if points:
                ax.plot(*zip(*sorted(points)), marker="o", label=name)
        ppe = [(int(n), pair["ppe"][key]) for n, pair in (results.get("local") or {}).items()  # type: ignore[union-attr]
               if pair.get("ppe") and "error" not in pair["ppe"] and pair["ppe"].get(key) is not None]
        if ppe:
            ax.plot(*zip(*sorted(ppe)), marker="s", linestyle="--", label="ProcessPoolExecutor")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("workers")
        ax.set_title(label)
        ax.legend(fontsize=7)
    fig.suptitle(f"Scale benchmark at {results['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def only_shapes(text: str) -> dict[str, list[Any]]:
    """``"128,16x8"`` -> local sizes ``[128]`` and srun shapes ``[(16, 8)]``."""
    local: list[int] = []
    srun: list[tuple[int, int]] = []
    for shape in filter(None, (part.strip() for part in text.split(","))):
        if "x" in shape:
            nodes, cpus = shape.split("x")
            srun.append((int(nodes), int(cpus)))
        else:
            local.append(int(shape))
    return {"local": local, "srun": srun}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CI variant")
    parser.add_argument("--local", action="store_true", help="local mode only")
    parser.add_argument("--srun", action="store_true", help="srun mode only")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--repeats", type=int, default=None, help="runs per cell (3; quick: 1)")
    parser.add_argument("--shapes", default=None,
                        help="only these sizes, comma-separated: local n (128), srun NODESxCPUS (16x8)")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "WORKERS"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    if args.shapes:
        plan.update(only_shapes(args.shapes))
    if args.child:
        child(args.child[0], int(args.child[1]), json.loads(args.sizes))
        return 0
    sizes = {k: plan[k] for k in ("map_items", "sleeps_per_worker", "submits", "idle_seconds")}
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {"commit": checkout_commit(), "when": time.strftime("%Y-%m-%d %H:%M"),
                                  "sizes": sizes, "local": {}, "srun": {}}
    repeats = args.repeats or (1 if args.quick else 3)
    results["repeats"] = repeats
    runs: dict[str, list[dict[str, object]]] = {}
    results["runs"] = runs
    if not args.srun:
        for n in plan["local"]:  # type: ignore[attr-defined]
            for _ in range(repeats):
                for kind in ("sulis", "ppe"):
                    runs.setdefault(f"local {n} {kind}", []).append(run_local(kind, n, sizes, args.timeout))
            pair = {kind: median_record(runs[f"local {n} {kind}"]) for kind in ("sulis", "ppe")}
            results["local"][str(n)] = pair  # type: ignore[index]
            print(f"local n={n}: ours {pair['sulis']}\n  PPE {pair['ppe']}", flush=True)
    if not args.local:
        for nodes, cpus in plan["srun"]:  # type: ignore[attr-defined]
            name = f"{nodes}x{cpus}"
            runs[f"srun {name}"] = [run_srun(nodes, cpus, sizes, args.timeout, out / "jobs")
                                    for _ in range(repeats)]
            record = median_record(runs[f"srun {name}"])
            results["srun"][name] = record  # type: ignore[index]
            print(f"srun {name}: {record}", flush=True)
    (out / "scale.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    (out / "scale.md").write_text(markdown(results))
    plot(results, out / "scale.png")
    print(f"wrote {out / 'scale.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
