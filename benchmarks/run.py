"""Run the benchmark suite: every measurement in a fresh process, side by side.

    python -m benchmarks.run            # full suite -> benchmarks/results/
    python -m benchmarks.run --quick    # smoke test, < 2 minutes -> benchmarks/results/quick/

See benchmarks/README.md. Timings are taken in the child processes
(``benchmarks.cases``); this driver only schedules them, interleaving repeats
across executors, kills a child that overruns its timeout, and aggregates
medians with min-max into a markdown table, a JSON file and a plot.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import psutil  # a dependency of distributed

from .cases import MARKER

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

LABELS = {
    "sulis": "SulisDaskExecutor (defaults)",
    "sulis_chunked": "SulisDaskExecutor, chunksize N/8",
    "sulis_spawn": "SulisDaskExecutor, mp_context=\"spawn\"",
    "ppe": "ProcessPoolExecutor, chunksize 1",
    "ppe_chunked": "ProcessPoolExecutor, chunksize N/8",
    "dask": "Dask client.map + gather",
    "dask_executor": "Dask client.get_executor().map",
    "mpi4py": "mpi4py.futures MPIPoolExecutor",
    "mpi4py_chunked": "mpi4py.futures, chunksize N/8",
}
BASE = ["sulis", "ppe", "dask", "dask_executor", "mpi4py"]
ALL = [
    "sulis",
    "sulis_chunked",
    "ppe",
    "ppe_chunked",
    "dask",
    "dask_executor",
    "mpi4py",
    "mpi4py_chunked",
]

#: Executors of the newer cases: each competitor once, where it is cheap
#: (raw Dask has no chunksize; the PSS case measures local clusters only).
MAPS = ["sulis", "ppe", "dask", "mpi4py"]
CHUNKSIZE = ["sulis", "ppe", "mpi4py"]
PSS = ["sulis", "sulis_spawn", "ppe"]

# case -> (sizes, executors, workers); the chunked variants differ only for
# map-like cases. workers None: N is the number of workers.
FULL = {
    "startup": ([0], BASE, 2),
    # N=1,000 is a cheap pilot: each larger N is skipped when the rate at the previous N
    # says it would take over the limit.
    "map": ([1_000, 10_000, 100_000, 1_000_000], ALL, 2),
    "submit": ([5_000], BASE, 2),
    "sleep": ([200], BASE, 8),
    "arrays": ([20], BASE, 2),
    "rss": ([10_000_000], ["sulis", "sulis_chunked", "ppe_chunked"], 2),
    # 200 calls in five distributions of durations, back to back in one executor.
    "uneven": ([200], MAPS, 8),
    # map(inc, range(100_000), chunksize=N)
    "chunksize": ([10, 100, 1000], CHUNKSIZE, 2),
    # N calls returning 8 MB each
    "results": ([20], MAPS, 2),
    # an idle cluster of N workers
    "pss": ([2, 8], PSS, None),
}
QUICK = dict(
    FULL,
    map=([200, 10_000], ALL, 2),
    submit=([200], BASE, 2),
    sleep=([20], BASE, 2),
    arrays=([5], BASE, 2),
    rss=([1_000_000], FULL["rss"][1], 2),
    uneven=([40], ["sulis", "ppe"], 2),
    chunksize=([100], CHUNKSIZE, 2),
    results=([3], ["sulis", "ppe"], 2),
    pss=([2], PSS, None),
)

METRIC = {
    "startup": "first_result_s",
    "map": "items_per_s",
    "submit": "tasks_per_s",
    "sleep": "efficiency",
    "arrays": "mb_per_s",
    "rss": "rss_growth_mb",
    "uneven": "eff_all_50ms",
    "chunksize": "items_per_s",
    "results": "mb_per_s",
    "pss": "pss_mb",
}


# -- running children --------------------------------------------------------


def _mpiexec():
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _kill_tree(proc):
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in children:  # anything that left the process group
        with contextlib.suppress(psutil.Error):
            child.kill()
    # Killed is not yet gone: until the kernel has torn a process down, its
    # memory maps still show, and an MPICH segment it mapped would look in
    # use to _remove_orphaned_segments (the smoke test saw one left behind).
    psutil.wait_procs(children, timeout=10)


#: MPICH's ranks share memory through files here; ranks killed at the
#: timeout leave theirs behind (3 MB each).
SHM = Path("/dev/shm")


def _mpich_segments():
    return set(SHM.glob("mpich_shm_*")) if SHM.is_dir() else set()


def _remove_orphaned_segments(paths):
    """Unlink those of ``paths`` that no process has open or mapped."""
    if not paths:
        return
    in_use = set()
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            in_use.update(m.path for m in proc.memory_maps(grouped=True))
            in_use.update(f.path for f in proc.open_files())
    for path in paths:
        if str(path) not in in_use:
            with contextlib.suppress(OSError):
                path.unlink()


def run_child(executor, case, n, workers, timeout):
    """One measurement in a fresh process (group); returns its record."""
    if not executor.startswith("mpi4py"):
        return _run_child(executor, case, n, workers, timeout)
    before = _mpich_segments()
    try:
        return _run_child(executor, case, n, workers, timeout)
    finally:
        _remove_orphaned_segments(_mpich_segments() - before)


def _run_child(executor, case, n, workers, timeout):
    args = ["-m", "benchmarks.cases", executor, case, str(n), str(workers)]
    if executor.startswith("mpi4py"):
        mpiexec = _mpiexec()
        if mpiexec is None or importlib.util.find_spec("mpi4py") is None:
            return {"status": "skipped", "reason": "skipped: mpi4py or mpiexec missing"}
        cmd = [
            mpiexec,
            "-n",
            str(workers + 1),
            sys.executable,
            "-m",
            "mpi4py.futures",
            *args,
        ]
    else:
        cmd = [sys.executable, *args]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p
        ),
    )
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        proc.communicate()
        return {
            "status": "timeout",
            "reason": f"timeout after {timeout:g} s",
            "wall_s": time.perf_counter() - t0,
        }
    wall = time.perf_counter() - t0
    _kill_tree(proc)  # stragglers, e.g. workers that outlived their client
    lines = [line for line in out.splitlines() if line.startswith(MARKER)]
    if not lines:
        tail = " | ".join(err.strip().splitlines()[-3:])
        return {
            "status": "error",
            "reason": f"exit {proc.returncode}, no result: {tail}"[:300],
            "wall_s": wall,
        }
    result = json.loads(lines[-1][len(MARKER) :])
    if "skip" in result:
        return {"status": "skipped", "reason": result["skip"], "wall_s": wall}
    if not result.pop("ok"):
        return {"status": "error", "reason": result["error"], "wall_s": wall}
    return {"status": "ok", "wall_s": wall, **result}


# -- scheduling ---------------------------------------------------------------


def _median(values):
    return statistics.median(values) if values else None


def estimate_skip(records, executor, case, n, limit):
    """Reason to skip (executor, case, n), from the same executor's map rates so far."""
    if case not in ("map", "rss"):
        return None
    earlier = [
        r
        for r in records
        if r["executor"] == executor
        and r["case"] == "map"
        and r["n"] < n
        and r["status"] != "skipped"
    ]
    if not earlier:
        return None
    largest = max(r["n"] for r in earlier)
    at_largest = [r for r in earlier if r["n"] == largest]
    rates = [r["items_per_s"] for r in at_largest if r["status"] == "ok"]
    if not rates:
        return f"skipped: map at N={largest:,} failed ({at_largest[0]['reason']})"
    # A chunk of N/8 scales with N; a rate measured at a smaller N is still the best guess.
    est = n / _median(rates)
    if est > limit:
        return f"skipped: est. {est:,.0f} s > {limit:g} s"
    return None


def run_suite(plan, repeats, timeout, limit, executors=None, cases=None, log=print):
    records = []
    for case, (sizes, names, workers) in plan.items():
        if cases and case not in cases:
            continue
        names = [e for e in names if not executors or e in executors]
        for n in sizes:
            w = n if workers is None else workers
            active = []
            for name in names:
                reason = estimate_skip(records, name, case, n, limit)
                if reason:
                    records.append(
                        {"executor": name, "case": case, "n": n, "workers": w}
                        | {"status": "skipped", "reason": reason}
                    )
                    log(f"{case:8} N={n:<10,} {name:15} {reason}")
                else:
                    active.append(name)
            for rep in range(repeats):
                # Interleave repeats across executors, rotating who goes first.
                shift = rep % len(active) if active else 0
                for name in active[shift:] + active[:shift]:
                    rec = dict(
                        executor=name,
                        case=case,
                        n=n,
                        workers=w,
                        repeat=rep,
                        **run_child(name, case, n, w, timeout),
                    )
                    records.append(rec)
                    value = rec.get(METRIC[case])
                    shown = (
                        f"{METRIC[case]}={value:.4g}"
                        if value is not None
                        else rec.get("reason")
                    )
                    log(
                        f"{case:8} N={n:<10,} {name:15} rep {rep}: {rec['status']} "
                        f"{shown} (wall {rec.get('wall_s', 0):.1f} s)"
                    )
    return records


# -- aggregation and reporting -------------------------------------------------


def summarise(records):
    """{(case, n, executor): {"status", "reason", metric: (median, min, max), ...}}."""
    groups = {}
    for r in records:
        groups.setdefault((r["case"], r["n"], r["executor"]), []).append(r)
    summary = {}
    for key, rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        entry = {"repeats_ok": len(ok), "repeats": len(rs)}
        if not ok:
            entry["status"] = rs[0]["status"]
            entry["reason"] = rs[0].get("reason", rs[0]["status"])
        else:
            entry["status"] = "ok" if len(ok) == len(rs) else "partial"
            bad = [r for r in rs if r["status"] != "ok"]
            if bad:
                entry["reason"] = (
                    f"{len(bad)} of {len(rs)} runs: {bad[0].get('reason')}"
                )
            for metric in ok[0]:
                if isinstance(ok[0][metric], float) and metric not in ("repeat",):
                    values = [r[metric] for r in ok]
                    entry[metric] = (
                        statistics.median(values),
                        min(values),
                        max(values),
                    )
        summary[key] = entry
    return summary


def _fmt(value, unit=""):
    if value is None:
        return "–"
    if unit == "/s":
        for div, suffix in ((1e6, "M"), (1e3, "k")):
            if abs(value) >= div:
                return f"{value / div:.3g}{suffix}"
        return f"{value:.3g}"
    return f"{value:.3g}"


def _cell(entry, metric, unit="", primary=True):
    if entry is None:
        return "–"
    if metric not in entry:
        return entry.get("reason", entry["status"]) if primary else "–"
    med, lo, hi = entry[metric]
    text = _fmt(med, unit)
    if entry["repeats_ok"] > 1:
        text += f" ({_fmt(lo, unit)}–{_fmt(hi, unit)})"
    if entry["status"] == "partial":
        text += f" [{entry['reason']}]"
    return text


def _med(summary, key, metric):
    entry = summary.get(key)
    return entry[metric][0] if entry and metric in entry else None


def _ratio(a, b):
    if a is None or not b:
        return "–"
    r = a / b
    return f"{r:.0f}×" if r >= 10 else f"{r:.2g}×"


def ppe_best(summary, n):
    values = [
        v
        for v in (
            _med(summary, ("map", n, e), "items_per_s") for e in ("ppe", "ppe_chunked")
        )
        if v is not None
    ]
    return max(values) if values else None


def targets(summary, plan):
    """[(target, measured, status)] for the issue's targets; nothing is asserted."""
    rows = []

    def add(name, value, ok, measured):
        status = "n/a (not measured)" if value is None else ("met" if ok else "MISSED")
        rows.append((name, measured, status))

    def why(key):
        entry = summary.get(key)
        return entry.get("reason", "not run") if entry else "not run"

    map_sizes = plan["map"][0]
    n = 100_000 if 100_000 in map_sizes else max(map_sizes)
    sulis = _med(summary, ("map", n, "sulis"), "items_per_s")
    best = ppe_best(summary, n)
    add(
        f"map N={n:,}, defaults ≥ 0.5× PPE best chunksize",
        sulis and best,
        sulis is not None and best is not None and sulis >= 0.5 * best,
        f"{_fmt(sulis, '/s')}/s vs {_fmt(best, '/s')}/s = {_ratio(sulis, best)}"
        if sulis and best
        else why(("map", n, "sulis")),
    )
    # Against Dask at the same N: the largest N at which Dask's run finished
    # (it is skipped at the larger ones, where it would take minutes).
    dask_n = max(
        (
            m
            for m in map_sizes
            if m <= n
            and _med(summary, ("map", m, "dask"), "items_per_s")
            and _med(summary, ("map", m, "sulis"), "items_per_s")
        ),
        default=None,
    )
    at_dask_n = _med(summary, ("map", dask_n, "sulis"), "items_per_s") if dask_n else None
    dask = _med(summary, ("map", dask_n, "dask"), "items_per_s") if dask_n else None
    add(
        f"map N={dask_n or n:,}, defaults ≥ 50× Dask client.map (same N)",
        at_dask_n and dask,
        at_dask_n is not None and dask is not None and at_dask_n >= 50 * dask,
        f"{_fmt(at_dask_n, '/s')}/s vs {_fmt(dask, '/s')}/s = {_ratio(at_dask_n, dask)}"
        if at_dask_n and dask
        else why(("map", n, "dask")),
    )
    for case, metric, label, factor in (
        ("submit", "tasks_per_s", "{m:,} submits ≥ 0.5× PPE", 0.5),
        ("arrays", "mb_per_s", "{m} × 8 MB arrays ≥ 1× PPE", 1.0),
    ):
        m = plan[case][0][0]
        label = label.format(m=m)
        s, p = (
            _med(summary, (case, m, "sulis"), metric),
            _med(summary, (case, m, "ppe"), metric),
        )
        add(
            label,
            s and p,
            s is not None and p is not None and s >= factor * p,
            f"{_fmt(s, '/s')} vs {_fmt(p, '/s')} = {_ratio(s, p)}"
            if s and p
            else why((case, m, "sulis")),
        )
    m = plan["sleep"][0][0]
    eff = _med(summary, ("sleep", m, "sulis"), "efficiency")
    add(
        f"sleep efficiency ≥ 0.97 ({m} sleeps, {plan['sleep'][2]} workers)",
        eff,
        eff is not None and eff >= 0.97,
        _fmt(eff) if eff else why(("sleep", m, "sulis")),
    )
    first = _med(summary, ("startup", 0, "sulis"), "first_result_s")
    add(
        "local startup → first result < 0.5 s (median)",
        first,
        first is not None and first < 0.5,
        f"{_fmt(first)} s" if first else why(("startup", 0, "sulis")),
    )
    m = plan["rss"][0][0]
    rss = _med(summary, ("rss", m, "sulis"), "rss_growth_mb")
    add(
        f"map of {m:,} items: client RSS growth < 200 MB",
        rss,
        rss is not None and rss < 200,
        f"{_fmt(rss)} MB" if rss is not None else why(("rss", m, "sulis")),
    )
    return rows


HEADS = {"tasks_per_s": "tasks/s", "efficiency": "efficiency", "mb_per_s": "MB/s"}


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def markdown(summary, plan, meta):
    dirty = " (uncommitted changes in sulis_executor/)" if meta["dirty"] else ""
    L = [
        f"# sulis_executor benchmarks ({meta['mode']})",
        "",
        f"- commit `{meta['commit']}`{dirty}, {meta['date']}",
        f"- {meta['machine']}; {meta['versions']}",
        (
            f"- `{meta['command']}`: {meta['repeats']} repeat(s), interleaved across "
            f"executors; every measurement in a fresh process (killed after "
            f"{meta['timeout']:g} s), with sulis_executor byte-compiled first, as "
            f"pip installs it; the suite took {meta['wall_s']:.0f} s"
        ),
        "- cells: median (min–max) over repeats; ratios compare medians",
        "",
        "## Targets (reported, not asserted)",
        "",
        *_table(["target", "measured", "status"], targets(summary, plan)),
    ]

    def get(case, n, e, metric):
        entry = summary.get((case, n, e))
        return entry, _med(summary, (case, n, e), metric)

    _, names, workers = plan["startup"]
    ppe = _med(summary, ("startup", 0, "ppe"), "first_result_s")
    rows = []
    for e in names:
        s, first = get("startup", 0, e, "first_result_s")
        rows.append(
            [LABELS[e], _cell(s, "first_result_s"), _ratio(first, ppe)]
            + [_cell(s, m, primary=False) for m in ("import_s", "cold_first_result_s")]
            + [_cell(s, m, primary=False) for m in ("shutdown_s", "wall_s")]
        )
    L += [
        f"## 1. Startup and shutdown ({workers} workers)",
        "",
        (
            "Constructor → first result of a trivial `submit`; *cold* adds importing the "
            "executor's module; *process* is the whole child process as the driver saw "
            "it (interpreter start, imports, startup, shutdown; for mpi4py also "
            "`mpiexec`, whose ranks are already running when the constructor is called)."
        ),
        "",
        *_table(
            ["executor", "constructor → first result (s)", "× PPE", "import (s)",
             "cold → first result (s)", "shutdown (s)", "process (s)"],
            rows,
        ),
    ]  # fmt: skip

    sizes, names, workers = plan["map"]
    rows = []
    for e in names:
        row = [LABELS[e]]
        for n in sizes:
            s, rate = get("map", n, e, "items_per_s")
            cell = _cell(s, "items_per_s", "/s")
            if rate is not None:
                cell += f" · {_ratio(rate, ppe_best(summary, n))}"
            row.append(cell)
        rows.append(row)
    L += [
        f"## 2. Tiny-task map, `map(inc, range(N))`: items/s ({workers} workers)",
        "",
        (
            "· ratio to the better of ProcessPoolExecutor's two chunksizes at the same N. "
            "A run that would take over the limit, estimated from the executor's rate at "
            "the previous N, is skipped."
        ),
        "",
        *_table(["executor"] + [f"N={n:,}" for n in sizes], rows),
    ]

    simple = (
        ("submit", "3. {n:,} × `submit`, then wait for all: tasks/s", "tasks_per_s", "/s"),
        ("sleep", "4. {n} × 50 ms sleeps: efficiency = ideal ÷ actual", "efficiency", ""),
        ("arrays", "5. {n} × 8 MB numpy arrays, `map(array_sum, arrays)`: MB/s",
         "mb_per_s", "/s"),
    )  # fmt: skip
    for case, title, metric, unit in simple:
        sizes, names, workers = plan[case]
        n = sizes[0]
        ppe = _med(summary, (case, n, "ppe"), metric)
        rows = []
        for e in names:
            s, value = get(case, n, e, metric)
            rows.append(
                [LABELS[e], _cell(s, metric, unit), _ratio(value, ppe)]
                + [_cell(s, "seconds", primary=False)]
            )
        L += [f"## {title.format(n=n)} ({workers} workers)", ""]
        if case == "sleep":
            L += [
                f"Ideal = {n} × 0.05 s ÷ {workers}; mpi4py: `mpiexec -n {workers + 1}`.",
                "",
            ]
        L += _table(["executor", HEADS[metric], "× PPE", "seconds"], rows)

    sizes, names, workers = plan["rss"]
    n = sizes[0]
    rows = []
    for e in names:
        s = summary.get(("rss", n, e))
        rows.append(
            [LABELS[e], _cell(s, "rss_growth_mb")]
            + [_cell(s, "items_per_s", "/s", primary=False)]
            + [_cell(s, "seconds", primary=False)]
        )
    title = f"Client peak RSS growth, `for r in ex.map(inc, range({n:,}))`"
    L += [
        f"## 6. {title} ({workers} workers)",
        "",
        (
            "Peak RSS of the client process (VmHWM, reset just before the map) minus its "
            "RSS before it. ProcessPoolExecutor submits every chunk at once (it has no "
            "`buffersize` before Python 3.14)."
        ),
        "",
        *_table(["executor", "RSS growth (MB)", "items/s", "seconds"], rows),
    ]
    L += _uneven_section(summary, plan)
    L += _chunksize_section(summary, plan)
    L += _results_section(summary, plan)
    L += _pss_section(summary, plan)
    return "\n".join(L)


#: The uneven case's distributions (``benchmarks.cases.uneven_durations``);
#: {early} and {late} are the slow call's place (11 and 151 of 200).
UNEVEN = (
    ("all_50ms", "all 50 ms"),
    ("early_1s", "call {early} takes 1 s"),
    ("late_1s", "call {late} takes 1 s"),
    ("rising", "10 ms rising to 60 ms"),
    ("lognormal", "log-normal, mean 50 ms"),
)

#: The executor alone, where the case sets what LABELS describe.
NAMES = {
    "sulis": "SulisDaskExecutor",
    "ppe": "ProcessPoolExecutor",
    "mpi4py": "mpi4py.futures MPIPoolExecutor",
}


def _with_ratio(summary, key, metric, unit, base):
    entry = summary.get(key)
    cell = _cell(entry, metric, unit)
    value = _med(summary, key, metric)
    if value is not None and base is not None:
        cell += f" · {_ratio(value, base)}"
    return cell


def _uneven_section(summary, plan):
    sizes, names, workers = plan["uneven"]
    n = sizes[0]
    places = dict(early=n * 10 // 200 + 1, late=n * 150 // 200 + 1)
    rows = []
    for e in names:
        row = [LABELS[e]]
        for name, _ in UNEVEN:
            metric = f"eff_{name}"
            ppe = _med(summary, ("uneven", n, "ppe"), metric)
            row.append(_with_ratio(summary, ("uneven", n, e), metric, "", ppe))
        rows.append(row)
    return [
        f"## 7. Uneven calls: {n} calls of `sleep_for(seconds)`, efficiency ({workers} workers)",
        "",
        (
            f"Five distributions of {n} call durations, each one `map(sleep_for, durations)` "
            "(chunksize 1), back to back in one executor after its warm-up; efficiency = "
            f"(sum of durations ÷ {workers}) ÷ actual; · ratio to ProcessPoolExecutor. "
            "The other calls of the slow-call cases take 50 ms; the log-normal durations "
            "(sigma 0.8) come from a fixed seed (`benchmarks.cases.uneven_durations`)."
        ),
        "",
        *_table(["executor"] + [label.format(**places) for _, label in UNEVEN], rows),
    ]


def _chunksize_section(summary, plan):
    from .cases import CHUNKED_ITEMS

    sizes, names, workers = plan["chunksize"]
    rows = []
    for e in names:
        rows.append(
            [NAMES.get(e, LABELS[e])]
            + [
                _with_ratio(
                    summary,
                    ("chunksize", k, e),
                    "items_per_s",
                    "/s",
                    _med(summary, ("chunksize", k, "ppe"), "items_per_s"),
                )
                for k in sizes
            ]
        )
    return [
        f"## 8. Explicit chunksize, `map(inc, range({CHUNKED_ITEMS:,}), chunksize=k)`: "
        f"items/s ({workers} workers)",
        "",
        "· ratio to ProcessPoolExecutor at the same k.",
        "",
        *_table(["executor"] + [f"k={k:,}" for k in sizes], rows),
    ]


def _results_section(summary, plan):
    sizes, names, workers = plan["results"]
    n = sizes[0]
    ppe = _med(summary, ("results", n, "ppe"), "mb_per_s")
    rows = []
    for e in names:
        s = summary.get(("results", n, e))
        rows.append(
            [LABELS[e], _cell(s, "mb_per_s", "/s"),
             _ratio(_med(summary, ("results", n, e), "mb_per_s"), ppe),
             _cell(s, "seconds", primary=False)]
        )  # fmt: skip
    return [
        f"## 9. Large results: {n} calls each returning a fresh 8 MB array, "
        f"`map(block_plus, range({n}))`: MB/s of results ({workers} workers)",
        "",
        (
            "Each worker makes one random 8 MB float64 block on first use (in the warm-up) "
            "and returns it plus the call's input: the time is sending results back."
        ),
        "",
        *_table(["executor", "MB/s", "× PPE", "seconds"], rows),
    ]


def _pss_section(summary, plan):
    sizes, names, _ = plan["pss"]
    rows = []
    for e in names:
        row = [NAMES.get(e, LABELS[e]) if e != "sulis" else "SulisDaskExecutor (fork server)"]
        for n in sizes:
            entry = summary.get(("pss", n, e))
            cell = _cell(entry, "pss_mb")
            per = _med(summary, ("pss", n, e), "pss_per_worker_mb")
            procs = _med(summary, ("pss", n, e), "processes")
            if per is not None:
                cell += f" · {per:.3g} per worker, {procs:.0f} processes"
            row.append(cell)
        rows.append(row)
    return [
        "## 10. Memory of an idle local cluster: PSS (MB)",
        "",
        (
            "Proportional set size (`Pss` of `/proc/PID/smaps_rollup`: private pages plus "
            "each shared page divided among the processes sharing it), summed over every "
            "process the client started, found recursively through /proc (fork server, "
            "agent and members; ProcessPoolExecutor's workers), not the client itself; "
            "measured after the warm-up, once the set of processes has not changed for 1 s. "
            "ProcessPoolExecutor's workers are forks of the client, which here has imported "
            "little, and share pages with it, which PSS charges partly to the client."
        ),
        "",
        *_table(["executor"] + [f"{n} workers" for n in sizes], rows),
    ]


def plot(summary, plan, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes, names, workers = plan["map"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for e in names:
        pts = [
            (n, summary[("map", n, e)]["items_per_s"])
            for n in sizes
            if "items_per_s" in summary.get(("map", n, e), {})
        ]
        if not pts:
            continue
        ns = [n for n, _ in pts]
        med = [v[0] for _, v in pts]
        err = [[v[0] - v[1] for _, v in pts], [v[2] - v[0] for _, v in pts]]
        ax.errorbar(
            ns,
            med,
            yerr=err,
            marker="o",
            capsize=3,
            label=LABELS[e],
            linestyle="--" if "chunked" in e else "-",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N (items)")
    ax.set_ylabel("items/s (median, min–max)")
    ax.set_title(f"map(inc, range(N)), {workers} workers — commit {meta['commit']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _meta(args, mode):
    def git(*cmd):
        try:
            return subprocess.run(
                ["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    versions = []
    for pkg in ("dask", "distributed", "mpi4py", "numpy"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{pkg} missing")
    return {
        "mode": mode,
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--", "sulis_executor")),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "versions": ", ".join(versions),
        "command": " ".join(["python -m benchmarks.run", *args]),
    }


def byte_compile_executor():
    """Compile sulis_executor's modules, as pip does when it installs a
    package: run from a source checkout (and with PYTHONDONTWRITEBYTECODE,
    which some environments set), every client, fork server and worker would
    otherwise compile them again, inside the times measured."""
    import compileall

    import sulis_executor

    compileall.compile_dir(os.path.dirname(sulis_executor.__file__), quiet=1)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 repeat, small N, finishes in under 2 minutes",
    )
    parser.add_argument(
        "--repeats", type=int, help="repeats per measurement (3; quick: 1)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        help="seconds before a child is killed (120; quick: 60)",
    )
    parser.add_argument(
        "--limit",
        type=float,
        help="skip runs estimated to take longer than this (60 s; quick: 10 s)",
    )
    parser.add_argument(
        "--executors", nargs="+", choices=list(LABELS), help="only these executors"
    )
    parser.add_argument(
        "--cases", nargs="+", choices=list(FULL), help="only these cases"
    )
    parser.add_argument(
        "--out", type=Path, help="results folder (results/; quick: results/quick/)"
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    quick = args.quick
    plan = QUICK if quick else FULL
    repeats = args.repeats or (1 if quick else 3)
    timeout = args.timeout or (60 if quick else 120)
    limit = args.limit or (10 if quick else 60)
    out = args.out or (RESULTS / "quick" if quick else RESULTS)

    meta = _meta(argv, "quick" if quick else "full")
    byte_compile_executor()
    t0 = time.perf_counter()
    records = run_suite(
        plan,
        repeats,
        timeout,
        limit,
        args.executors,
        args.cases,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    meta.update(
        wall_s=time.perf_counter() - t0, repeats=repeats, timeout=timeout, limit=limit
    )
    summary = summarise(records)

    out.mkdir(parents=True, exist_ok=True)
    table = markdown(summary, plan, meta)
    (out / "latest.md").write_text(table + "\n")
    (out / "latest.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "plan": {
                    c: {"sizes": s, "executors": e, "workers": w}
                    for c, (s, e, w) in plan.items()
                },
                "records": records,
                "summary": [
                    {"case": c, "n": n, "executor": e, **v}
                    for (c, n, e), v in summary.items()
                ],
            },
            indent=1,
        )
        + "\n"
    )
    try:
        plot(summary, plan, out / "throughput.png", meta)
    except ImportError:
        print(
            "matplotlib missing: no plot (pip install -r benchmarks/requirements.txt)",
            file=sys.stderr,
        )
    print(table)
    print(
        f"\nwrote {out}/latest.md, latest.json, throughput.png in {meta['wall_s']:.0f} s",
        file=sys.stderr,
    )
    errors = [r for r in records if r["status"] == "error"]
    for r in errors:
        print(
            f"ERROR {r['case']} N={r['n']} {r['executor']}: {r['reason']}",
            file=sys.stderr,
        )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
