"""The resume journal (issue 18): its file format and keys, and a rerun
that runs only what the journal lacks, after a clean exit or a SIGKILL."""

from __future__ import annotations

import functools
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import pytest

from sulis_executor import SulisDaskExecutor, _journal
from sulis_executor._journal import Journal, NotAJournalError, call_key, function_digest
from sulis_executor.cli import main
from tests.waiting import wait_until

SCRIPT = Path(__file__).with_name("journal_script.py")
REPO = Path(__file__).resolve().parent.parent


def expected(x: int) -> tuple[int, Fraction, dict[str, int]]:
    return x, Fraction(x, 3), {"square": x * x}


# -- the file format ------------------------------------------------------------


def test_round_trip(tmp_path):
    path = tmp_path / "run.journal"
    journal = Journal(str(path))
    keys = [bytes([i]) * 32 for i in range(5)]
    values = [1, "two", (3.0, Fraction(1, 3)), {"four": [4]}, None]
    for key, value in zip(keys, values):
        journal.record(key, value)
    assert journal.lookup(keys[2]) == (True, values[2])  # still buffered: read back too
    journal.close()
    again = Journal(str(path))
    assert len(again) == 5
    for key, value in zip(keys, values):
        hit, got = again.lookup(key)
        assert hit and got == value and type(got) is type(value)
    assert again.lookup(b"x" * 32) == (False, None)
    again.close()
    assert _journal.inspect(str(path))[:2] == (5, path.stat().st_size)


def test_a_torn_last_record_is_ignored_and_overwritten_at_every_offset(tmp_path):
    path = tmp_path / "run.journal"
    journal = Journal(str(path))
    journal.record(b"a" * 32, "first")
    journal.record(b"b" * 32, "second")
    journal.close()
    start = path.stat().st_size
    journal = Journal(str(path))
    journal.record(b"c" * 32, "third" * 10)
    journal.close()
    whole = path.read_bytes()
    assert len(whole) > start
    for cut in range(start, len(whole)):
        path.write_bytes(whole[:cut])
        assert _journal.inspect(str(path)) == (2, cut, cut - start)
        torn = Journal(str(path))
        assert len(torn) == 2, cut
        assert torn.lookup(b"a" * 32) == (True, "first")
        assert torn.lookup(b"b" * 32) == (True, "second")
        assert torn.lookup(b"c" * 32) == (False, None)
        torn.record(b"d" * 32, "after")
        torn.close()
        assert _journal.inspect(str(path))[2] == 0, cut  # the torn tail is gone
        reread = Journal(str(path))
        assert len(reread) == 3, cut
        assert reread.lookup(b"d" * 32) == (True, "after")
        assert reread.lookup(b"c" * 32) == (False, None)
        reread.close()


def test_a_file_that_is_not_a_journal_is_refused_naming_it(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("x,y\n1,2\n3,4\n5,6\n")
    with pytest.raises(NotAJournalError, match="results.csv is not a sulis_executor journal"):
        Journal(str(path))
    # Before any worker starts, and the file is left alone.
    with pytest.raises(NotAJournalError, match="results.csv"):
        SulisDaskExecutor(journal=str(path), max_workers=1)
    assert path.read_text() == "x,y\n1,2\n3,4\n5,6\n"


def test_the_option_comes_from_the_environment_too(tmp_path, monkeypatch):
    path = tmp_path / "not-a-journal"
    path.write_bytes(b"\x00" * 100)
    monkeypatch.setenv("SULIS_EXECUTOR_JOURNAL", str(path))
    with pytest.raises(NotAJournalError, match="not-a-journal"):
        SulisDaskExecutor(max_workers=1)


def define(source: str, name: str = "f"):
    namespace = {"__name__": "user_module"}
    exec(textwrap.dedent(source), namespace)
    return namespace[name]


def test_a_changed_function_misses_and_the_same_one_hits(tmp_path):
    one = define("def f(x):\n    return x + 1\n")
    same = define("def f(x):\n    return x + 1\n")
    assert function_digest(one) == function_digest(same)
    changed = [
        define("def f(x):\n    return x + 2\n"),
        define("def f(x, y=1):\n    return x + y\n"),
        define("def f(x):\n    return x + 1 if x in {'a', 'b'} else 0\n"),
        define("def g(x):\n    return x + 1\n", "g"),
        define("K = 1\ndef f(x):\n    return x + K\n"),
        define("def h(x):\n    return x\ndef f(x):\n    return h(x) + 1\n"),
    ]
    digests = {function_digest(fn) for fn in changed} | {function_digest(one)}
    assert len(digests) == len(changed) + 1
    # A module constant or a helper it uses, changed: a miss too.
    assert function_digest(define("K = 1\ndef f(x):\n    return x + K\n")) != \
        function_digest(define("K = 2\ndef f(x):\n    return x + K\n"))
    assert function_digest(define("def h(x):\n    return x\ndef f(x):\n    return h(x)\n")) != \
        function_digest(define("def h(x):\n    return -x\ndef f(x):\n    return h(x)\n"))
    # Closures and partials: their values count.
    maker = define("def make(k):\n    return lambda x: x * k\n", "make")
    assert function_digest(maker(2)) != function_digest(maker(3))
    assert function_digest(maker(2)) == function_digest(maker(2))
    assert function_digest(functools.partial(pow, 2)) != function_digest(functools.partial(pow, 3))
    # Keys: same function and arguments, same key; otherwise not.
    digest = function_digest(one)
    assert call_key(digest, (1,), {}) == call_key(digest, (1,), {})
    assert call_key(digest, (1,), {}) != call_key(digest, (2,), {})
    assert call_key(digest, (1,), {}) != call_key(function_digest(changed[0]), (1,), {})

    path = tmp_path / "run.journal"
    journal = Journal(str(path))
    journal.record(call_key(digest, (1,), {}), 2)
    journal.close()
    journal = Journal(str(path))
    assert journal.lookup(call_key(function_digest(same), (1,), {})) == (True, 2)
    assert journal.lookup(call_key(function_digest(changed[0]), (1,), {})) == (False, None)
    journal.close()


KEY_SCRIPT = """
import functools, sys
from fractions import Fraction
from sulis_executor._journal import call_key, function_digest

SCALE = 3

def helper(x):
    return x * SCALE

def f(x, *, label="a"):
    return helper(x) if label in {"a", "b", "c"} else (x, 1.5, None)

for fn in (f, functools.partial(f, label="b"), lambda x: f(x) + 1):
    print(call_key(function_digest(fn), (Fraction(1, 3), "text", (1, 2.5)), {"label": "c"}).hex())
"""


def test_the_same_function_and_arguments_hit_across_processes(tmp_path):
    script = tmp_path / "keys.py"
    script.write_text(KEY_SCRIPT)
    runs = []
    for seed in ("1", "2"):  # string hashing differs between the runs
        env = dict(os.environ, PYTHONHASHSEED=seed)
        runs.append(subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                                   env=env, check=True, timeout=60).stdout.split())
    assert len(runs[0]) == 3 and len(set(runs[0])) == 3
    assert runs[0] == runs[1]
    script.write_text(KEY_SCRIPT.replace("SCALE = 3", "SCALE = 4"))
    changed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             check=True, timeout=60).stdout.split()
    assert all(a != b for a, b in zip(changed, runs[0]))


def test_the_journal_command_counts_and_clears(tmp_path, capsys):
    path = tmp_path / "run.journal"
    journal = Journal(str(path))
    for i in range(7):
        journal.record(bytes([i]) * 32, i)
    journal.close()
    size = path.stat().st_size
    assert main(["journal", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: 7 calls, {size} bytes"
    assert main(["journal", str(path), "--clear"]) == 0
    capsys.readouterr()
    assert _journal.inspect(str(path)) == (0, len(_journal.MAGIC), 0)
    assert main(["journal", str(path)]) == 0
    assert "0 calls" in capsys.readouterr().out
    other = tmp_path / "data.txt"
    other.write_text("precious data, not a journal\n")
    assert main(["journal", str(other), "--clear"]) == 2
    assert "not a sulis_executor journal" in capsys.readouterr().err
    assert other.read_text() == "precious data, not a journal\n"


# -- the executor --------------------------------------------------------------


def executions(marks: Path) -> list[int]:
    return sorted(int(name.split("-")[0]) for name in os.listdir(marks))


def run_script(journal: Path, marks: Path, stop: int, out: Path) -> list:
    ran = subprocess.run([sys.executable, str(SCRIPT), str(journal), str(marks), str(stop), str(out)],
                         capture_output=True, text=True, timeout=240, cwd=REPO)
    assert ran.returncode == 0, ran.stderr[-3000:]
    with open(out, "rb") as handle:
        return pickle.load(handle)


def assert_serial(results: list, stop: int) -> None:
    serial = [expected(x) for x in range(stop)] + [expected(1000)]
    assert results == serial
    for got, want in zip(results, serial):
        assert [type(v) for v in got] == [type(v) for v in want]


@pytest.mark.timeout(300)
def test_a_rerun_runs_only_what_is_missing(tmp_path):
    journal, marks = tmp_path / "run.journal", tmp_path / "marks"
    marks.mkdir()
    assert_serial(run_script(journal, marks, 24, tmp_path / "first.pickle"), 24)
    assert executions(marks) == sorted([*range(24), 1000])
    assert _journal.inspect(str(journal))[0] == 25
    for mark in marks.iterdir():
        mark.unlink()
    assert_serial(run_script(journal, marks, 40, tmp_path / "second.pickle"), 40)
    assert executions(marks) == list(range(24, 40))  # only the new items
    for mark in marks.iterdir():
        mark.unlink()
    assert_serial(run_script(journal, marks, 40, tmp_path / "third.pickle"), 40)
    assert executions(marks) == []


@pytest.mark.timeout(300)
def test_journaled_submit_and_map_in_process(tmp_path):
    path = tmp_path / "run.journal"

    def boom(x):
        if x == 3:
            raise ValueError("three")
        return x * 2

    with SulisDaskExecutor(max_workers=2, journal=str(path)) as ex:
        assert ex.submit(pow, 2, 10).result() == 1024
        results = ex.map(boom, range(6), chunksize=2)
        assert [next(results) for _ in range(3)] == [0, 2, 4]
        with pytest.raises(ValueError, match="three"):
            next(results)
        assert list(ex.map(pow, [2, 3], [5, 2])) == [32, 9]
    assert _journal.inspect(str(path))[0] == 6  # pow(2, 10) and pow(2, 5) are one key apart
    with SulisDaskExecutor(max_workers=2, journal=str(path)) as ex:
        done = ex.submit(pow, 2, 10)
        assert done.done() and done.result() == 1024  # recorded: done at once
        results = ex.map(boom, range(6))
        assert [next(results) for _ in range(3)] == [0, 2, 4]
        with pytest.raises(ValueError, match="three"):  # exceptions are not recorded
            next(results)
        assert list(ex.map(pow, [2, 3, 4], [5, 2, 2])) == [32, 9, 16]


@pytest.mark.timeout(300)
def test_a_client_killed_mid_map_reruns_only_what_the_journal_lacks(tmp_path):
    journal, marks = tmp_path / "run.journal", tmp_path / "marks"
    marks.mkdir()
    stop = 160
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(journal), str(marks), str(stop),
                             str(tmp_path / "killed.pickle")], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: journal.exists() and _journal.inspect(str(journal))[0] >= 10,
                   timeout=120, what="the journal to hold 10 records")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its workers too
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.pickle").exists()
    recorded, _, _ = _journal.inspect(str(journal))
    assert 10 <= recorded < stop
    for mark in marks.iterdir():
        mark.unlink()
    results = run_script(journal, marks, stop, tmp_path / "rerun.pickle")
    assert_serial(results, stop)
    ran = executions(marks)
    assert len(ran) == len(set(ran)) == stop + 1 - recorded


@pytest.mark.timeout(300)
def test_executors_in_one_process_share_the_journal_and_read_after_shutdown_records(tmp_path):
    path = tmp_path / "run.journal"
    with SulisDaskExecutor(max_workers=1, journal=str(path)) as ex:
        results = ex.map(pow, range(5), [2] * 5)
    assert list(results) == [0, 1, 4, 9, 16]  # read after the with block: still recorded
    with SulisDaskExecutor(max_workers=1, journal=str(path)) as one, \
            SulisDaskExecutor(max_workers=1, journal=str(path)) as two:
        assert one.submit(pow, 3, 2).done() and two.submit(pow, 4, 2).done()
        assert one.submit(pow, 7, 2).result() == 49
        assert two.submit(pow, 8, 2).result() == 64
    _journal.open_journal(str(path)).flush()
    assert _journal.inspect(str(path))[0] == 7
