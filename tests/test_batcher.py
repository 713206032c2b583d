"""MicroBatcher: whole batches when busy, bounded waits when not, and a clean stop."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import pytest

from pipeline.batcher import MicroBatcher

# Scheduling slack on a loaded 2-core CI machine.
SLACK_S = 0.25


def _queue_with(items: list[int]) -> queue.Queue[int]:
    source: queue.Queue[int] = queue.Queue()
    for item in items:
        source.put(item)
    return source


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def test_batches_never_exceed_max_size(stop: threading.Event) -> None:
    batcher = MicroBatcher(_queue_with(list(range(10))), max_size=4, max_wait_ms=20)
    batches = [batcher.next_batch(stop) for _ in range(3)]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_full_batch_returns_without_waiting(stop: threading.Event) -> None:
    batcher = MicroBatcher(_queue_with(list(range(8))), max_size=8, max_wait_ms=5_000)
    started = time.monotonic()
    assert batcher.next_batch(stop) == list(range(8))
    assert time.monotonic() - started < 1.0


def test_zero_wait_takes_only_what_is_already_queued(stop: threading.Event) -> None:
    batcher = MicroBatcher(_queue_with([1, 2, 3]), max_size=10, max_wait_ms=0)
    started = time.monotonic()
    assert batcher.next_batch(stop) == [1, 2, 3]
    assert time.monotonic() - started < SLACK_S


def test_max_wait_bounds_a_batch_from_a_slow_producer(stop: threading.Event) -> None:
    source: queue.Queue[tuple[int, float]] = queue.Queue()
    max_wait_s = 0.3

    def produce() -> None:
        for index in range(40):
            if stop.is_set():
                return
            source.put((index, time.monotonic()))
            time.sleep(0.05)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    batcher = MicroBatcher(source, max_size=100, max_wait_ms=int(max_wait_s * 1000))
    batch = batcher.next_batch(stop)
    returned = time.monotonic()
    stop.set()
    producer.join(timeout=5)

    first_arrival = batch[0][1]
    waited = returned - first_arrival
    # The wait starts at the first item and lasts max_wait, no shorter and not much longer.
    assert max_wait_s - 0.02 <= waited <= max_wait_s + SLACK_S
    assert 2 <= len(batch) < 100
    assert [index for index, _ in batch] == list(range(len(batch)))


def test_wait_starts_with_the_first_item_not_the_call(stop: threading.Event) -> None:
    source: queue.Queue[int] = queue.Queue()
    timer = threading.Timer(0.4, source.put, args=(1,))
    timer.start()
    batcher = MicroBatcher(source, max_size=10, max_wait_ms=100)
    started = time.monotonic()
    assert batcher.next_batch(stop, idle_poll_s=0.05) == [1]
    elapsed = time.monotonic() - started
    assert 0.4 + 0.1 - 0.02 <= elapsed <= 0.4 + 0.1 + SLACK_S
    timer.join()


def test_returns_empty_batch_when_stopped_while_idle(stop: threading.Event) -> None:
    batcher = MicroBatcher(queue.Queue(), max_size=4, max_wait_ms=50)
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    assert batcher.next_batch(stop, idle_poll_s=0.05) == []
    assert time.monotonic() - started <= 0.2 + SLACK_S


def test_returns_empty_batch_when_already_stopped(stop: threading.Event) -> None:
    stop.set()
    batcher = MicroBatcher(queue.Queue(), max_size=4, max_wait_ms=50)
    started = time.monotonic()
    assert batcher.next_batch(stop) == []
    assert time.monotonic() - started < SLACK_S


def test_items_are_never_lost_or_reordered_across_batches(stop: threading.Event) -> None:
    source: queue.Queue[int] = queue.Queue()
    total = 500

    def produce() -> None:
        for index in range(total):
            source.put(index)
            if index % 37 == 0:
                time.sleep(0.002)

    producer = threading.Thread(target=produce)
    producer.start()
    batcher = MicroBatcher(source, max_size=16, max_wait_ms=5)
    seen: list[int] = []
    while len(seen) < total:
        batch = batcher.next_batch(stop, idle_poll_s=0.05)
        assert 1 <= len(batch) <= 16
        seen.extend(batch)
    producer.join()
    assert seen == list(range(total))
