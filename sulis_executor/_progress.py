"""Progress bars for futures and result iterators, fit for batch job output.

.. code-block:: python

    from sulis_executor import progress

    futures = [ex.submit(f, x) for x in inputs]
    for future in progress(futures):          # as they complete, like as_completed
        handle(future.result())

    for result in progress(ex.map(f, inputs), total=len(inputs)):
        handle(result)

Where the output goes decides how the bar looks:

* a terminal: tqdm's ordinary bar, redrawn in place;
* a Jupyter notebook (``file`` not given): ``tqdm.auto``'s widget;
* anything else, such as a batch job's output file: one plain line (count,
  percentage, rate and ETA) at most every ``mininterval`` seconds (30 by
  default) and a final line, without the carriage returns that would
  otherwise fill the file with one redrawn bar per update.

Needs tqdm (``pip install tqdm``).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, as_completed
from typing import IO, Any, TypeVar

__all__ = ["progress"]

T = TypeVar("T")

#: Seconds between lines when the output is not a terminal (a job's log file).
LOG_INTERVAL = 30.0
#: Seconds between redraws in a terminal or notebook (tqdm's default).
TTY_INTERVAL = 0.1

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _import_tqdm() -> Any:
    try:
        import tqdm.std  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        raise ImportError(
            "sulis_executor.progress needs tqdm, which is not installed: pip install tqdm"
        ) from None
    return tqdm.std


def _in_notebook() -> bool:
    """True in a Jupyter kernel (where tqdm.auto draws a widget)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # noqa: BLE001 - any failure means no notebook
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class _LineWriter:
    """A file for tqdm that turns each in-place redraw (``"\\r" + bar``) into a
    line of its own: no carriage returns, no padding, no cursor movement."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        for part in re.split(r"[\r\n]", _ANSI.sub("", str(text))):
            part = part.rstrip()
            if part:
                self._stream.write(part + "\n")
        return len(text)

    def flush(self) -> None:
        flush = getattr(self._stream, "flush", None)
        if flush is not None:
            flush()


_line_class: Any = None


def _line_tqdm_class(tqdm_std: Any) -> Any:
    """tqdm without its monitor thread (whose forced redraws would break the
    one-line-per-interval promise); made once, on first use."""
    global _line_class
    if _line_class is None:
        class LineTqdm(tqdm_std.tqdm):  # type: ignore[misc, name-defined]
            monitor_interval = 0

        _line_class = LineTqdm
    return _line_class


def _bar_factory(file: IO[str] | None, mininterval: float | None,
                 desc: str | None) -> Callable[..., Any]:
    """A function making the bar suited to where the output goes."""
    tqdm_std = _import_tqdm()
    cls: Any
    kwargs: dict[str, Any]
    if file is None and _in_notebook():
        from tqdm.auto import tqdm as auto_tqdm  # type: ignore[import-untyped, unused-ignore]

        cls, kwargs = auto_tqdm, {"mininterval": mininterval or TTY_INTERVAL}
    else:
        stream = sys.stderr if file is None else file
        if _isatty(stream):
            cls, kwargs = tqdm_std.tqdm, {"file": stream,
                                           "mininterval": mininterval or TTY_INTERVAL}
        else:
            interval = LOG_INTERVAL if mininterval is None else mininterval
            cls, kwargs = _line_tqdm_class(tqdm_std), {
                "file": _LineWriter(stream),
                "mininterval": interval,
                # Check the clock at every update: with tqdm's adaptive
                # miniters a slowdown after a fast start would hide progress
                # for far longer than the interval.
                "miniters": 1,
                "ascii": True,
                "ncols": 80,
                "dynamic_ncols": False,
            }

    def make(total: int | None, **extra: Any) -> Any:
        return cls(total=total, desc=desc, **kwargs, **extra)

    return make


def _is_future_collection(iterable: Iterable[Any]) -> bool:
    if iter(iterable) is iterable:  # an iterator: looked at lazily instead
        return False
    found = False
    for item in iterable:
        if not isinstance(item, Future):
            return False
        found = True
    return found


def _len_or_none(iterable: Any) -> int | None:
    try:
        return len(iterable)
    except (TypeError, AttributeError):
        return None


def _completed(futures: list[Future[Any]], bar: Any) -> Iterator[Future[Any]]:
    for future in as_completed(futures):
        bar.update(1)
        yield future


def _run(iterable: Iterable[Any], total: int | None, make_bar: Callable[..., Any]) -> Iterator[Any]:
    if _is_future_collection(iterable):
        futures = list(iterable)
        bar = make_bar(len(futures) if total is None else total, unit="task")
        try:
            yield from _completed(futures, bar)
        finally:
            bar.close()
        return

    bar = make_bar(_len_or_none(iterable) if total is None else total)
    iterator = iter(iterable)
    try:
        first = next(iterator, _END)
        if first is _END:
            return
        if isinstance(first, Future):
            # An iterator of futures, e.g. a generator of submit() calls:
            # read it to the end (as as_completed does) and wait on them all.
            futures = [first, *iterator]
            if total is None:
                bar.total = len(futures)
            bar.unit = "task"
            bar.refresh()
            yield from _completed(futures, bar)
            return
        bar.update(1)
        yield first
        for item in iterator:
            bar.update(1)
            yield item
    except GeneratorExit:
        # Closing the progress iterator closes what it wraps: for a map
        # results iterator, that cancels the calls not yet done.
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
        raise
    finally:
        bar.close()


_END = object()


def progress(
    iterable_or_futures: Iterable[T],
    total: int | None = None,
    *,
    desc: str | None = None,
    file: IO[str] | None = None,
    mininterval: float | None = None,
) -> Iterator[T]:
    """Iterate with a progress bar (count, rate and ETA).

    ``iterable_or_futures``: ``concurrent.futures.Future`` objects (a list,
    set, dict keys, or an iterator of them, which is read to the end first),
    yielded as they complete, like :func:`concurrent.futures.as_completed`;
    or any other iterable, such as the iterator ``executor.map`` returns,
    whose items are yielded in order as they come. Closing the returned
    iterator early closes the wrapped one (which cancels a ``map``'s pending
    calls).

    ``total``: the number of items, for the percentage and ETA; by default
    the number of futures, or ``len(iterable)`` when it has one.
    ``desc``: a label for the bar. ``file``: where it goes (default
    ``sys.stderr``). ``mininterval``: seconds between updates of the bar;
    by default 0.1 in a terminal or notebook and 30 when the output is not a
    terminal (a batch job's output file), where each update is a plain line.

    Raises ImportError if tqdm is not installed.
    """
    if isinstance(iterable_or_futures, Future):
        raise TypeError("progress() takes an iterable of futures, not a single future")
    make_bar = _bar_factory(file, mininterval, desc)
    return _run(iterable_or_futures, total, make_bar)
