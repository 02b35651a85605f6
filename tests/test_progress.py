"""sulis_executor.progress: futures as they complete, or any iterable, with a
tqdm bar; plain bounded lines when the output is not a terminal."""

from __future__ import annotations

import io
import sys
import time
import types
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from sulis_executor import _progress as progress_module
from sulis_executor import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def nap(x: int, seconds: float = 0.02) -> int:
    time.sleep(seconds)
    return x


def assert_plain_lines(text: str, most: int) -> list[str]:
    assert "\r" not in text
    assert "\x1b" not in text
    lines = text.splitlines()
    assert text.endswith("\n")
    assert all(line.strip() for line in lines)
    assert 1 <= len(lines) <= most, text
    return lines


@pytest.mark.timeout(60)
def test_futures_yielded_as_completed_with_bounded_plain_lines() -> None:
    out = io.StringIO()
    with ThreadPoolExecutor(4) as ex:
        # 60 tasks of 0.05 s on 4 threads: about 0.75 s.
        futures = [ex.submit(nap, i, 0.05) for i in range(60)]
        started = time.monotonic()
        seen = []
        for future in progress(futures, file=out, mininterval=0.2, desc="naps"):
            assert future.done()
            seen.append(future.result())
        elapsed = time.monotonic() - started
    assert sorted(seen) == list(range(60))
    # At most one line per interval, plus the first and the last.
    lines = assert_plain_lines(out.getvalue(), most=int(elapsed / 0.2) + 3)
    assert lines[-1].startswith("naps: 100%")
    assert "60/60" in lines[-1] and "task/s" in lines[-1]
    assert "0/60" in lines[0]


@pytest.mark.timeout(60)
def test_default_interval_off_a_terminal_is_long() -> None:
    out = io.StringIO()
    with ThreadPoolExecutor(4) as ex:
        futures = [ex.submit(nap, i, 0.001) for i in range(500)]
        assert len(list(progress(futures, file=out))) == 500
    lines = assert_plain_lines(out.getvalue(), most=3)
    assert "500/500" in lines[-1]


@pytest.mark.timeout(60)
def test_wraps_a_map_iterator_in_order() -> None:
    out = io.StringIO()
    with ThreadPoolExecutor(4) as ex:
        results = list(progress(ex.map(nap, range(50)), total=50, file=out, mininterval=0.1))
    assert results == list(range(50))
    lines = assert_plain_lines(out.getvalue(), most=20)
    assert "50/50" in lines[-1] and "100%" in lines[-1]


@pytest.mark.timeout(60)
def test_iterable_without_total_shows_count() -> None:
    out = io.StringIO()
    assert list(progress((i * i for i in range(7)), file=out)) == [i * i for i in range(7)]
    lines = assert_plain_lines(out.getvalue(), most=3)
    assert lines[-1].startswith("7it")
    out = io.StringIO()
    assert list(progress(range(5), file=out)) == list(range(5))  # len() gives the total
    assert "5/5" in out.getvalue().splitlines()[-1]


@pytest.mark.timeout(60)
def test_generator_of_futures_and_dict_of_futures() -> None:
    with ThreadPoolExecutor(2) as ex:
        out = io.StringIO()
        done = list(progress((ex.submit(nap, i) for i in range(10)), file=out))
        assert all(isinstance(f, Future) and f.done() for f in done)
        assert sorted(f.result() for f in done) == list(range(10))
        assert "10/10" in out.getvalue().splitlines()[-1]

        out = io.StringIO()
        by_future = {ex.submit(nap, i): i for i in range(6)}
        for future in progress(by_future, file=out):
            assert future.result() == by_future[future]
        assert "6/6" in out.getvalue().splitlines()[-1]


@pytest.mark.timeout(60)
def test_exceptions_stay_in_their_futures() -> None:
    def boom(x: int) -> int:
        raise ValueError(x)

    with ThreadPoolExecutor(2) as ex:
        futures = [ex.submit(boom, i) for i in range(3)]
        errors = [type(f.exception()) for f in progress(futures, file=io.StringIO())]
    assert errors == [ValueError] * 3


@pytest.mark.timeout(60)
def test_closing_early_closes_the_wrapped_iterator() -> None:
    closed = []

    def results():
        try:
            yield from range(100)
        finally:
            closed.append(True)

    out = io.StringIO()
    it = progress(results(), total=100, file=out, mininterval=0)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert closed == [True]
    assert "3/100" in out.getvalue().splitlines()[-1]


@pytest.mark.timeout(60)
def test_terminal_gets_an_ordinary_tqdm_bar() -> None:
    out = Terminal()
    with ThreadPoolExecutor(2) as ex:
        futures = [ex.submit(nap, i, 0.01) for i in range(20)]
        assert len(list(progress(futures, file=out, mininterval=0))) == 20
    text = out.getvalue()
    assert "\r" in text  # redrawn in place
    assert "20/20" in text


def test_single_future_is_refused() -> None:
    future: Future[int] = Future()
    with pytest.raises(TypeError, match="iterable of futures"):
        progress(future)  # type: ignore[arg-type]


def test_missing_tqdm_says_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.std", None)
    with pytest.raises(ImportError, match="pip install tqdm"):
        progress([1, 2, 3])  # raised at the call, not at the first next()


def test_notebook_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not progress_module._in_notebook()
    shell = types.SimpleNamespace(config={"IPKernelApp": {}})
    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: shell  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert progress_module._in_notebook()
    shell.config = {}  # a terminal IPython: not a notebook
    assert not progress_module._in_notebook()


@pytest.mark.timeout(120)
def test_with_sulis_executor_futures() -> None:
    from sulis_executor import SulisDaskExecutor

    out = io.StringIO()
    with SulisDaskExecutor(max_workers=1) as ex:
        futures = [ex.submit(pow, i, 2) for i in range(30)]
        results = sorted(f.result() for f in progress(futures, file=out, mininterval=0.5))
        mapped = list(progress(ex.map(pow, range(10), range(10)), total=10, file=out,
                               mininterval=0.5))
    assert results == sorted(i * i for i in range(30))
    assert mapped == [i**i for i in range(10)]
    text = out.getvalue()
    assert_plain_lines(text, most=12)
    assert "30/30" in text and "10/10" in text.splitlines()[-1]
