"""When to try publishing again after the broker refused or was unreachable.

The worker keeps its unpublished outcomes and retries the whole checkpoint
with backoff; past `retry.publish_budget_s` of continuous failure, or on an
error no retry can fix, it gives up so the process exits (code 4) instead of
holding partitions it cannot make progress on.
"""

from __future__ import annotations

import time

import structlog

from pipeline.config import RetrySettings
from pipeline.errors import PublishError
from pipeline.retry import backoff_seconds

log = structlog.get_logger("labelstream.worker")


class PublishRetry:
    def __init__(self, settings: RetrySettings) -> None:
        self._settings = settings
        self._failing_since: float | None = None
        self._attempts = 0
        self._next_at = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self._next_at

    def succeeded(self) -> None:
        self._failing_since, self._attempts = None, 0

    def failed(self, exc: PublishError, waiting: int) -> PublishError | None:
        """Schedule the next try; the error to stop the worker with once retrying is pointless."""
        now = time.monotonic()
        self._failing_since = self._failing_since or now
        self._attempts += 1
        budget = self._settings.publish_budget_s
        if not exc.retryable or now - self._failing_since > budget:
            return PublishError(f"outputs could not be published (budget {budget:.0f}s): {exc.message}")
        delay = backoff_seconds(self._attempts, self._settings)
        self._next_at = now + delay
        log.warning("publish_retry", error=str(exc), attempt=self._attempts, backoff_s=round(delay, 3), waiting=waiting)
        return None
