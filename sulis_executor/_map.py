"""``Executor.map``: chunk sizing, a bounded window, and ordered results.

Two things make ``map`` fast on Dask, where every chunk costs a round trip
(a message to a node's agent, or a Dask task on a cluster the executor did
not start):

* **Adaptive chunks.** When the caller leaves ``chunksize`` at its default,
  items are grouped into chunks sized from measurement, in the spirit of
  joblib's automatic batch size: the first chunks hold one item each, two
  per worker thread (the calls may be long); once a chunk comes back, its
  measured time per item sets the next sizes so a chunk takes about
  ``TARGET_CHUNK_SECONDS``. When the number of items is known, chunks are
  also capped so every worker thread gets a share, and shrink near the end
  so the threads finish together (see ``ChunkSizer.next_size``). An
  explicit ``chunksize`` is honoured exactly.
* **A bounded window.** Only ``buffersize`` chunks (by default four per worker
  thread, or with an explicit ``chunksize`` enough for 100,000 items, up to
  10,000 chunks) are submitted and not yet yielded; the next one is submitted
  as each completes. Chunks of an explicit ``chunksize`` that measure short
  travel to the cluster several to a task, as submitted calls do (each still
  runs, and is pickled, on its own). Inputs are read lazily, so a ``map``
  over ten million items, or an infinite generator, runs in bounded memory.

``ProcessPoolExecutor.map`` (without ``buffersize``) submits every call at
once, so its results can still be read after ``shutdown()``: the Sulis
page's ``concurrent.futures`` example prints them after its ``with`` block.
So a map still reading its inputs when the executor shuts down is finished
first (:meth:`MapFeed.drain`): the rest is submitted, and ``shutdown()``
lets it run. With ``cancel_futures=True`` it is cut instead
(:meth:`MapFeed.cut`): reading past what was submitted raises
``CancelledError``, as the cancelled futures of ``ProcessPoolExecutor``'s
map do. A map given ``buffersize`` is not finished: like CPython's, it
submits more only as its results are read, which shutdown forbids. Nor is a
map whose iterator has ended, or was never returned (Ctrl-C in ``map()``),
nor any map when an exception leaves the executor's ``with`` block (the code
after it, which could read the results, does not run).
"""

from __future__ import annotations

import collections
import itertools
import math
import operator
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

from ._batching import batch_seconds
from ._calls import rebuild_exception

#: Adaptive chunks aim to take about this long on a worker (joblib aims at
#: 0.2-2 s). Each chunk costs a round trip during which its worker idles: the
#: agent's message for it (a few milliseconds on 2 cores), or a scheduler
#: round trip when it goes as a Dask task. Near the end of known-length
#: input, chunks shrink, but not below the minimum per thread: smaller ones
#: cost more in round trips than they win in balance.
TARGET_CHUNK_SECONDS = 0.5
MIN_CHUNK_SECONDS = 0.01
MAX_CHUNK_ITEMS = 200_000
#: Default window: chunks submitted and not yet yielded, per worker thread.
WINDOW_PER_THREAD = 4
#: With an explicit ``chunksize``, the default window holds at least this
#: many items (but at most ``MAX_WINDOW_CHUNKS`` chunks): short chunks then
#: travel to the cluster several to a task, which needs a queue of them.
WINDOW_ITEMS = 100_000
MAX_WINDOW_CHUNKS = 10_000


def default_window(threads: int, chunksize: int | None) -> int:
    """Chunks in flight when ``buffersize`` is not given; ``chunksize`` is
    ``None`` when left to the executor."""
    window = WINDOW_PER_THREAD * threads
    if chunksize is None:
        return window
    return max(window, min(MAX_WINDOW_CHUNKS, WINDOW_ITEMS // chunksize))


class AutoChunksize(int):
    """The default ``chunksize``: equal to 1, as in CPython, but recognisable
    by identity, so an explicit ``chunksize=1`` is still honoured exactly."""

    def __repr__(self) -> str:
        return "1"


AUTO_CHUNKSIZE = AutoChunksize(1)


def items_hint(iterables: tuple[Iterable[Any], ...]) -> int | None:
    """How many items ``zip(*iterables)`` will give, if every input says."""
    hints = [operator.length_hint(it, -1) for it in iterables]
    if not hints or min(hints) < 0:
        return None
    return min(hints)


class ChunkSizer:
    """Decides each chunk's size: fixed, or adapted to measured item times."""

    def __init__(self, fixed: int | None, threads: Callable[[], int], total: int | None) -> None:
        self._fixed = fixed
        self._threads = threads
        self._remaining = total
        self._seconds_per_item: float | None = None
        self._timed_items = 0.0
        self._timed_seconds = 0.0
        self._remaining_when_first_timed: int | None = None
        self._well_timed = False

    def may_submit(self, in_flight: int) -> bool:
        """Whether another chunk may go now, with ``in_flight`` not yet done.

        Until a chunk of several items has been timed, at most two chunks
        per worker thread are out: first one-item probes (the calls may be
        long; the second keeps a thread busy while the first one's timing
        travels back), then chunks sized from a single call's timing, a
        noisy guess, since it times the loop around the call as much as the
        call. More one-item chunks would queue ahead of the sized chunks the
        first timing allows, each costing a round trip (the main cost of a
        tiny-task map).
        """
        return self.well_timed or in_flight < 2 * self._threads()

    @property
    def seconds_per_item(self) -> float | None:
        """The measured seconds per item, once a chunk came back (automatic
        chunks only)."""
        return self._seconds_per_item

    @property
    def well_timed(self) -> bool:
        """Chunk sizes no longer depend on the next timing."""
        return self._fixed is not None or self._well_timed

    def next_size(self) -> int:
        if self._fixed is not None:
            return self._fixed
        if self._seconds_per_item is None:
            return 1
        per_item = max(self._seconds_per_item, 1e-8)
        target = batch_seconds(TARGET_CHUNK_SECONDS, self._threads())
        most = int(MAX_CHUNK_ITEMS * target / TARGET_CHUNK_SECONDS)  # grows with the length
        size = max(1, min(int(target / per_item), most))
        if self._remaining is not None:
            # Known-length input. The bulk of it goes in chunks giving each
            # worker thread two shares of what was left when calls were first
            # timed, or one share while two would each take less than a
            # round trip: tiny calls pay more in round trips than they win in
            # balance. The tail then splits what is left among the threads,
            # shrinking as it goes (guided self-scheduling), but not below a
            # round trip's worth per thread.
            threads = max(1, self._threads())
            worth_a_trip = int(MIN_CHUNK_SECONDS / per_item)
            known = self._remaining_when_first_timed or 0
            bulk = max(math.ceil(known / (2 * threads)), min(math.ceil(known / threads), worth_a_trip))
            tail = max(math.ceil(self._remaining / threads), min(self._remaining, worth_a_trip // threads))
            size = max(1, min(size, bulk, tail))
        return size

    def took(self, items: int) -> None:
        if self._remaining is not None:
            self._remaining = max(0, self._remaining - items)

    def observe(self, items: int, seconds: float) -> None:
        if self._fixed is not None or items == 0:
            return
        # Recent chunks count most, each in proportion to its items: a
        # one-item probe times the loop around the call as much as the call.
        self._timed_items = 0.5 * self._timed_items + items
        self._timed_seconds = 0.5 * self._timed_seconds + seconds
        if self._seconds_per_item is None:
            self._remaining_when_first_timed = self._remaining
        self._seconds_per_item = self._timed_seconds / self._timed_items
        self._well_timed = self._well_timed or items > 1


SubmitChunks = Callable[[Callable[..., Any], list[tuple[list[Any], int]], bool], list[Future[Any]]]


class MapFeed:
    """A map's inputs not yet submitted, and its chunks not yet yielded."""

    def __init__(self, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...],
                 sizer: ChunkSizer, window: int, submit_chunks: SubmitChunks,
                 threads: Callable[[], int], submit_rest: SubmitChunks | None = None) -> None:
        self._fn = fn
        # One iterable: send bare items, which pickle faster than 1-tuples.
        self._star = len(iterables) != 1
        self._items: Iterator[Any] = zip(*iterables) if self._star else iter(iterables[0])
        self._position = 0  # index of the next item, for error messages
        self._sizer = sizer
        self._window = window
        self._submit_chunks = submit_chunks
        self._submit_rest = submit_rest or submit_chunks
        self._threads = threads
        self.pending: collections.deque[Future[Any]] = collections.deque()
        # Chunks done and timed before their turn to be yielded (while probing).
        self.timed: set[Future[Any]] = set()
        # Held while reading the inputs and adding to ``pending``: shutdown
        # may finish the map from another thread while it is being read.
        self._lock = threading.Lock()
        self._refilling = True

    def refill(self) -> None:
        """Submit chunks while the window and the sizer allow."""
        with self._lock:
            if not self._refilling:
                return
            chunks: list[tuple[list[Any], int]] = []
            while (len(self.pending) + len(chunks) < self._window
                   and self._sizer.may_submit(len(self.pending) + len(chunks) - len(self.timed))):
                chunk = self._take(self._sizer.next_size())
                if chunk is None:
                    break
                chunks.append(chunk)
            if chunks:
                self.pending.extend(self._submit_chunks(self._fn, chunks, self._star))

    def _take(self, size: int) -> tuple[list[Any], int] | None:
        chunk = list(itertools.islice(self._items, size))
        if not chunk:
            return None
        self._sizer.took(len(chunk))
        first, self._position = self._position, self._position + len(chunk)
        return chunk, first

    def stop_refilling(self) -> None:
        """From now on only :meth:`drain` or :meth:`cut` add chunks (a
        refill under way finishes first)."""
        with self._lock:
            self._refilling = False

    def drain(self) -> None:
        """Submit every input left (with ``submit_rest``, which works after
        shutdown has refused new work), as
        ``ProcessPoolExecutor.map`` would have at once: in chunks of the
        map's next size or, before any chunk has been timed, two per worker
        thread."""
        with self._lock:
            self._refilling = False
            rest = list(self._items)
            if not rest:
                return
            size = self._sizer.next_size()
            if not self._sizer.well_timed:
                size = max(size, math.ceil(len(rest) / (2 * max(1, self._threads()))))
            self._items = iter(rest)
            chunks = []
            while (chunk := self._take(size)) is not None:
                chunks.append(chunk)
            self.pending.extend(self._submit_rest(self._fn, chunks, self._star))

    def end(self) -> None:
        """The results iterator has ended (read to the end, closed, dropped,
        or failed): there is nothing left to finish."""
        with self._lock:
            self._refilling = False
            self._items = iter(())

    def cut(self) -> None:
        """End the map where it is: reading past the chunks submitted
        raises ``CancelledError``, if any input was left."""
        with self._lock:
            self._refilling = False
            if next(self._items, _END) is not _END:
                cancelled: Future[Any] = Future()
                cancelled.cancel()
                self.pending.append(cancelled)
            self._items = iter(())

    def unyielded(self) -> list[Future[Any]]:
        with self._lock:
            return list(self.pending)


_END = object()


def ordered_results(
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    sizer: ChunkSizer,
    window: int,
    submit_chunks: SubmitChunks,
    end_time: float | None,
    abandon: Callable[[list[Future[Any]]], None],
    threads: Callable[[], int] = lambda: 1,
    finish: tuple[Callable[[MapFeed], None], SubmitChunks] | None = None,
) -> Iterator[Any]:
    """Submit the first ``window`` chunks now; return the results iterator.
    ``submit_chunks(fn, [(chunk, index of its first item), ...], star)``
    submits chunks together (the engine sends them to the cluster as one
    graph). ``abandon`` is given the chunks nobody will read, when the
    iterator ends early. ``finish`` is ``(track, submit_rest)``: ``track``
    is given the map's :class:`MapFeed`, for shutdown to finish (with
    ``submit_rest``) or cut; the feed lives as long as the iterator."""
    track, submit_rest = finish if finish is not None else (None, None)
    feed = MapFeed(fn, iterables, sizer, window, submit_chunks, threads, submit_rest)
    feed.refill()
    results = _results(feed, sizer, end_time, abandon)
    # Only once the iterator exists: a map interrupted (Ctrl-C) while
    # submitting its first chunks has no iterator to finish, as
    # ProcessPoolExecutor's, interrupted while submitting, runs only what it
    # had submitted.
    if track is not None:
        track(feed)
    return results


def _observe(sizer: ChunkSizer, future: Future[Any]) -> None:
    """Time a finished chunk (a failed or cancelled one tells nothing)."""
    if future.cancelled() or future.exception() is not None:
        return
    (values, error), seconds = future.result()
    sizer.observe(len(values) + (error is not None), seconds)


def _results(
    feed: MapFeed,
    sizer: ChunkSizer,
    end_time: float | None,
    abandon: Callable[[list[Future[Any]]], None],
) -> Iterator[Any]:
    pending, timed, refill = feed.pending, feed.timed, feed.refill
    try:
        while pending:
            future = pending[0]
            try:
                # While probing, any chunk that finishes is timed at once,
                # not when its turn to be yielded comes, so the sized chunks
                # go out as soon as the first probe is back, whichever it is.
                while not sizer.well_timed and not future.done():
                    timeout = None if end_time is None else max(0.0, end_time - time.monotonic())
                    done, _ = wait([f for f in feed.unyielded() if f not in timed], timeout,
                                   FIRST_COMPLETED)
                    if not done:
                        break  # timed out: result() below says so
                    for finished in done:
                        if finished is not future:
                            timed.add(finished)
                            _observe(sizer, finished)
                    refill()
                if end_time is None:
                    (values, error), seconds = future.result()
                else:
                    (values, error), seconds = future.result(end_time - time.monotonic())
                if future in timed:
                    timed.discard(future)
                else:
                    sizer.observe(len(values) + (error is not None), seconds)
            finally:
                del future
            pending.popleft()
            refill()
            # Pop as we go: the paused iterator must not keep a result alive
            # once it has been handed out (CPython's bpo-14406).
            values.reverse()
            while values:
                yield values.pop()
            del values
            if error is not None:
                raise rebuild_exception(error[1], error[2])
    finally:
        # Closed, dropped, timed out or failed: nobody will read the rest.
        # Chunks not yet started never run; those a worker is running finish,
        # as running calls do in ProcessPoolExecutor. And shutdown has no
        # inputs left to finish: a traceback may keep this feed alive.
        feed.end()
        timed.clear()
        left = feed.unyielded()
        if left:
            abandon(left)
