"""Per-key token buckets: `per_second` tokens a second, at most `burst` saved up."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class RateLimiter:
    def __init__(self, per_second: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second, self.burst = per_second, burst
        self._clock = clock
        # key id -> (tokens, when they were counted)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.per_second > 0

    def take(self, key_id: str) -> float | None:
        """None when a request may go ahead; else the seconds until it may (Retry-After)."""
        if not self.enabled:
            return None
        now = self._clock()
        with self._lock:
            tokens, since = self._buckets.get(key_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - since) * self.per_second)
            if tokens >= 1.0:
                self._buckets[key_id] = (tokens - 1.0, now)
                return None
            self._buckets[key_id] = (tokens, now)
        return (1.0 - tokens) / self.per_second


def retry_after_header(seconds: float) -> dict[str, str]:
    """Retry-After takes whole seconds; round up so a client that obeys it is let through."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}
