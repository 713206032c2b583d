"""Micro-batching: gather ready items into batches for the model."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

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
