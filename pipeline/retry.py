"""Retrying transient failures: exponential backoff with full jitter, within a time budget."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from pipeline.config import RetrySettings
from pipeline.errors import LabelstreamError

T = TypeVar("T")


def backoff_seconds(attempt: int, settings: RetrySettings, rng: random.Random | None = None) -> float:
    """Full jitter (AWS's recommendation): uniform in [0, min(cap, base * 2**attempt)]."""
    ceiling = min(settings.max_backoff_ms, settings.initial_backoff_ms * (2 ** min(attempt, 30))) / 1000.0
    return (rng or random).uniform(0, ceiling)


class RetryOutcome(Exception):
    """Raised when retrying stops: carries the last error and how many attempts were made."""

    def __init__(self, error: LabelstreamError, attempts: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts


def call_with_retries(
    operation: Callable[[], T],
    settings: RetrySettings,
    cancelled: threading.Event | None = None,
    on_retry: Callable[[LabelstreamError, int, float], None] | None = None,
) -> tuple[T, int]:
    """Run `operation`, retrying retryable LabelstreamErrors until the budget is spent.

    Returns (result, attempts). Raises RetryOutcome with the final error.
    """
    deadline = time.monotonic() + settings.budget_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return operation(), attempt
        except LabelstreamError as exc:
            delay = backoff_seconds(attempt - 1, settings)
            if not exc.retryable or time.monotonic() + delay > deadline:
                raise RetryOutcome(exc, attempt) from exc
            if on_retry is not None:
                on_retry(exc, attempt, delay)
            if cancelled is not None and cancelled.wait(delay):
                raise RetryOutcome(exc, attempt) from exc
            if cancelled is None:
                time.sleep(delay)
