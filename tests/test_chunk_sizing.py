"""How ``map`` sizes its chunks when the caller leaves ``chunksize`` alone.

Pure logic: a ``ChunkSizer`` is driven by hand with the timings a cluster
would report, and the sizes it asks for are checked against the promises in
``sulis_executor._map``: one-item probes first, chunks sized from measured
call times, every worker thread given a share, a tail that lets the threads
finish together, and no chunk too small to pay for its round trip.
"""

from __future__ import annotations

import pytest

from sulis_executor._batching import MAX_BATCHES_PER_SECOND, TARGET_BATCH_SECONDS, batch_size
from sulis_executor._map import MIN_CHUNK_SECONDS, TARGET_CHUNK_SECONDS, ChunkSizer


def plan(sizer: ChunkSizer, total: int) -> list[int]:
    """The chunk sizes for the rest of ``total`` items, in order."""
    sizes = []
    while total > 0:
        size = min(sizer.next_size(), total)
        sizer.took(size)
        total -= size
        sizes.append(size)
    return sizes


def probed(total: int | None, threads: int, seconds_per_call: float) -> ChunkSizer:
    """A sizer whose first probe came back, timed one call."""
    sizer = ChunkSizer(None, lambda: threads, total)
    assert sizer.next_size() == 1
    sizer.took(1)
    sizer.observe(1, seconds_per_call)
    return sizer


def test_an_explicit_chunksize_is_honoured_exactly() -> None:
    sizer = ChunkSizer(7, lambda: 4, 100)
    sizer.observe(7, 0.0001)
    assert plan(sizer, 30) == [7, 7, 7, 7, 2]
    assert sizer.may_submit(1000)


def test_until_a_chunk_is_timed_only_one_item_probes_go_two_per_thread() -> None:
    sizer = ChunkSizer(None, lambda: 4, 1000)
    assert [sizer.next_size() for _ in range(3)] == [1, 1, 1]
    assert sizer.may_submit(7) and not sizer.may_submit(8)


def test_after_a_one_item_timing_only_what_the_cluster_takes_at_once_goes() -> None:
    sizer = probed(1000, 4, 0.001)
    assert not sizer.well_timed
    assert sizer.may_submit(7) and not sizer.may_submit(8)
    sizer.observe(50, 0.05)  # a chunk of several items: a trustworthy timing
    assert sizer.well_timed and sizer.may_submit(1000)


def test_tiny_calls_go_in_one_or_two_big_shares_per_thread_with_no_dribbling_tail() -> None:
    sizer = probed(100_000, 2, 50e-9)
    sizes = plan(sizer, 99_999)
    assert sum(sizes) == 99_999
    assert len(sizes) <= 4, sizes  # each chunk costs a round trip
    assert min(sizes) >= 99_999 // 4, sizes


def test_long_calls_fill_the_target_time_then_shrink_so_threads_finish_together() -> None:
    threads = 8
    sizer = probed(1000, threads, 0.05)
    sizes = plan(sizer, 999)
    assert max(sizes) == int(TARGET_CHUNK_SECONDS / 0.05)
    assert sizes[-threads + 1:] == [1] * (threads - 1)  # the last round: one call each
    assert sizes == sorted(sizes, reverse=True)


def test_the_tail_never_shrinks_below_a_round_trip_of_work_per_thread() -> None:
    per_call = 1e-5
    sizer = probed(10_000, 4, per_call)
    sizer.observe(1000, 1000 * per_call)  # timed properly
    sizes = plan(sizer, 9_999)
    floor = int(MIN_CHUNK_SECONDS / per_call) // 4
    assert all(size >= floor for size in sizes[:-1]), sizes


@pytest.mark.parametrize("per_call", [1e-7, 1e-3, 2.0])
def test_unknown_length_input_is_sized_by_time_alone(per_call: float) -> None:
    sizer = probed(None, 4, per_call)
    expected = max(1, min(int(TARGET_CHUNK_SECONDS / per_call), 200_000))
    assert [sizer.next_size() for _ in range(3)] == [expected] * 3


# -- how long batches get as the cluster grows ---------------------------------
# Each batch costs the scheduler's process the same, so the batches the
# whole cluster runs per second are capped: past MAX_BATCHES_PER_SECOND x the
# target length, batches get longer in proportion to the worker threads.


@pytest.mark.parametrize("threads", [8, 256, 12_800, 128_000])
def test_map_chunks_keep_the_cluster_under_the_batch_rate_cap(threads: int) -> None:
    per_call = 1e-4
    sizer = probed(None, threads, per_call)
    seconds = sizer.next_size() * per_call
    assert seconds == pytest.approx(max(TARGET_CHUNK_SECONDS, threads / MAX_BATCHES_PER_SECOND), rel=0.01)
    assert threads / seconds <= MAX_BATCHES_PER_SECOND * 1.01


@pytest.mark.parametrize("threads", [8, 20, 256, 12_800])
def test_batches_of_submitted_calls_keep_the_cluster_under_the_batch_rate_cap(threads: int) -> None:
    per_call = 1e-5
    queued = 10**12  # a steady stream: the fair share of the queue does not bind
    seconds = batch_size(queued, per_call, threads) * per_call
    if threads <= 20:
        assert seconds == pytest.approx(TARGET_BATCH_SECONDS, rel=0.01)
    else:
        assert seconds == pytest.approx(threads / MAX_BATCHES_PER_SECOND, rel=0.01)
    assert threads / seconds <= MAX_BATCHES_PER_SECOND * 1.01


def test_long_calls_still_go_one_to_a_batch_on_a_big_cluster() -> None:
    # 256 threads: 0.256 s batches, so 0.5 s calls stay one each.
    assert batch_size(10**6, 0.5, 256) == 1


# -- a map the executor shuts down under (sulis_executor._map.MapFeed) --------


def run_now(fn, chunks, star):
    """Stands in for the engine: runs each chunk at once, as a finished future."""
    from concurrent.futures import Future

    done = []
    for chunk, _first in chunks:
        future: Future = Future()
        future.set_result((([fn(*item) if star else fn(item) for item in chunk], None), 0.001))
        done.append(future)
    return done


def opened_map(n: int, chunksize: int | None, window: int = 4):
    """A map of ``square`` over ``range(n)`` and its feed, with its first
    window submitted, as ``SulisDaskExecutor.map`` makes them."""
    from sulis_executor._map import ordered_results

    feeds: list = []
    submitted: list[int] = []

    def submit(fn, chunks, star):
        submitted.extend(len(chunk) for chunk, _ in chunks)
        return run_now(fn, chunks, star)

    results = ordered_results(lambda x: x * x, (range(n),), ChunkSizer(chunksize, lambda: 2, n),
                              window, submit, None, lambda futures: None, lambda: 2,
                              (feeds.append, submit))
    return results, feeds[0], submitted


def test_shutdown_finishes_a_map_submitting_every_input_left_in_chunks_for_each_thread() -> None:
    results, feed, submitted = opened_map(1000, None)
    assert sum(submitted) == 4  # one-item probes only, so far
    feed.stop_refilling()
    feed.drain()
    # Untimed: the 996 left go as two chunks per worker thread, at once.
    assert submitted[4:] == [249, 249, 249, 249]
    assert list(results) == [x * x for x in range(1000)]


def test_a_map_cut_by_shutdown_yields_what_was_submitted_then_raises_cancelled_error() -> None:
    from concurrent.futures import CancelledError

    results, feed, submitted = opened_map(100, 5)
    feed.stop_refilling()
    feed.cut()
    assert [next(results) for _ in range(20)] == [x * x for x in range(20)]  # 4 chunks of 5
    with pytest.raises(CancelledError):
        next(results)


def test_a_map_cut_with_no_input_left_ends_as_usual() -> None:
    results, feed, _ = opened_map(20, 5)
    feed.cut()
    assert list(results) == [x * x for x in range(20)]


def test_a_map_whose_iterator_has_ended_has_nothing_left_to_finish() -> None:
    # Ctrl-C in a map inside "with executor": the iterator fails, but the
    # traceback keeps its feed alive while __exit__ shuts the executor down.
    results, feed, submitted = opened_map(1000, 5)
    next(results)
    results.close()
    read = sum(submitted)
    feed.drain()
    assert sum(submitted) == read < 1000


def test_a_map_interrupted_while_submitting_its_first_chunks_is_not_finished_at_shutdown() -> None:
    # Ctrl-C in map() itself: there is no iterator to read the rest, and
    # ProcessPoolExecutor, interrupted while submitting, runs only what it had.
    from sulis_executor._map import ordered_results

    def interrupted(fn, chunks, star):
        raise KeyboardInterrupt

    feeds: list = []
    with pytest.raises(KeyboardInterrupt):
        ordered_results(lambda x: x, (range(1000),), ChunkSizer(5, lambda: 2, 1000), 4,
                        interrupted, None, lambda futures: None, lambda: 2,
                        (feeds.append, interrupted))
    assert feeds == []
