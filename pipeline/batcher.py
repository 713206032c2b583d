"""Micro-batching: gather ready items into batches for the model."""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, Literal, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    """Batches of at most `max_size`, waiting at most `max_wait_ms` to fill one.

    The wait starts when the first item of a batch arrives. It is adaptive
    when `more_coming` is given: the batch goes out as soon as nothing more is
    on its way (the model is free and nobody is waiting on a timer), and waits
    up to `max_wait_ms` only while items are still being prepared. Under load
    items queue up while the model runs, so batches fill to `max_size`.
    """

    def __init__(
        self,
        source: queue.Queue[T],
        max_size: int,
        max_wait_ms: int,
        more_coming: Callable[[], bool] | None = None,
    ) -> None:
        self._source = source
        self.max_size = max_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._more_coming = more_coming

    def next_batch(self, stop: threading.Event, idle_poll_s: float = 0.1) -> list[T]:
        """Block until at least one item is ready (or `stop` is set), then fill."""
        first = self._first_item(stop, idle_poll_s)
        if first is None:
            return []
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_size:
            if self._more_coming is not None and self._source.empty() and not self._more_coming():
                break
            remaining = deadline - time.monotonic()
            try:
                item = self._source.get(timeout=remaining) if remaining > 0 else self._source.get_nowait()
            except queue.Empty:
                break
            batch.append(item)
        return batch

    def _first_item(self, stop: threading.Event, idle_poll_s: float) -> T | None:
        while not stop.is_set():
            try:
                return self._source.get(timeout=idle_poll_s)
            except queue.Empty:
                continue
        return None


Lane = Literal["interactive", "stream"]


class LaneBatcher(Generic[T]):
    """One batch from two bounded lanes: interactive (HTTP) first, up to its share, then stream (Kafka).

    When both lanes are waiting, the interactive lane gets at least
    `ceil(interactive_share * max_size)` slots and the stream lane the rest;
    either lane fills the slots the other leaves empty, so neither starves the
    other and no slot is wasted. Waiting is adaptive as in MicroBatcher: the
    batch goes out when it is full, when nothing more is on its way
    (`more_coming`), or `max_wait_ms` after its first item.

    `discard` is asked once about every item as it leaves its lane; True drops
    it (its caller went away), so cancelled work never reaches the model.
    A full interactive lane refuses at once (queue.Full): an HTTP caller is
    told to come back, it does not wait. A full stream lane blocks the putter.
    """

    def __init__(
        self,
        max_size: int,
        max_wait_ms: int,
        interactive_share: float = 0.5,
        capacity: dict[Lane, int] | None = None,
        more_coming: Callable[[], bool] | None = None,
        discard: Callable[[T], bool] | None = None,
        interactive_max_size: int | None = None,
    ) -> None:
        self.max_size = max_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.interactive_share = interactive_share
        # A batch holding interactive items is cut to this size: on a CPU the model call grows
        # with the batch, and an HTTP caller should not wait for 31 stream images to be encoded.
        self.interactive_max_size = min(interactive_max_size or max_size, max_size)
        self._capacity = capacity or {}
        self._more_coming = more_coming
        self._discard = discard
        self._lanes: dict[Lane, deque[T]] = {"interactive": deque(), "stream": deque()}
        self._changed = threading.Condition()

    def put(self, lane: Lane, item: T, stop: threading.Event | None = None) -> None:
        with self._changed:
            while self._is_full(lane):
                if lane == "interactive":
                    raise queue.Full(f"the {lane} lane holds {len(self._lanes[lane])} items")
                if stop is not None and stop.is_set():
                    return
                self._changed.wait(0.1)
            self._lanes[lane].append(item)
            self._changed.notify_all()

    def put_all(self, lane: Lane, items: list[T]) -> None:
        """All of `items` or none: raises queue.Full when the lane has no room for every one."""
        with self._changed:
            limit = self._capacity.get(lane, 0)
            if limit > 0 and len(self._lanes[lane]) + len(items) > limit:
                raise queue.Full(f"the {lane} lane holds {len(self._lanes[lane])} of {limit} items")
            self._lanes[lane].extend(items)
            self._changed.notify_all()

    def depth(self, lane: Lane) -> int:
        with self._changed:
            return len(self._lanes[lane])

    def nudge(self) -> None:
        """Something `more_coming` reads changed: let a waiting batch re-check it."""
        with self._changed:
            self._changed.notify_all()

    def next_batch(self, stop: threading.Event, idle_poll_s: float = 0.1) -> list[T]:
        """Block until an item is waiting (or `stop` is set), fill as above, take. May be [] if all were dropped."""
        with self._changed:
            while not self._waiting():
                if stop.is_set():
                    return []
                self._changed.wait(idle_poll_s)
            self._fill(time.monotonic() + self.max_wait_s)
            batch = self._take()
            self._changed.notify_all()
        return batch

    def _fill(self, deadline: float) -> None:
        while self._waiting() < self._batch_size():
            if self._more_coming is not None and not self._more_coming():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            # Short waits: `more_coming` can turn false without an item arriving (a prepare failed).
            self._changed.wait(min(remaining, 0.01))

    def _take(self) -> list[T]:
        interactive, stream = self._lanes["interactive"], self._lanes["stream"]
        size = self._batch_size()
        # The share is of this batch's size, so a capped batch still leaves the stream its slots.
        quota = max(1, math.ceil(self.interactive_share * size))
        from_interactive = min(len(interactive), max(quota, size - len(stream)))
        from_stream = min(len(stream), size - from_interactive)
        taken = [interactive.popleft() for _ in range(from_interactive)]
        taken += [stream.popleft() for _ in range(from_stream)]
        if self._discard is None:
            return taken
        return [item for item in taken if not self._discard(item)]

    def _batch_size(self) -> int:
        return self.interactive_max_size if self._lanes["interactive"] else self.max_size

    def _waiting(self) -> int:
        return len(self._lanes["interactive"]) + len(self._lanes["stream"])

    def _is_full(self, lane: Lane) -> bool:
        limit = self._capacity.get(lane, 0)
        return limit > 0 and len(self._lanes[lane]) >= limit
