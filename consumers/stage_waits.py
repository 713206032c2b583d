"""How long each stage of the worker sat waiting, so the bottleneck is visible.

A stage that waits a lot is not the bottleneck; the one that never waits is.
The waits feed the `labelstream_stage_wait_seconds` histogram and a periodic
`throughput` log line with images/s and each stage's share of time spent waiting.
"""

from __future__ import annotations

import threading
import time

import structlog

from pipeline import metrics

log = structlog.get_logger("labelstream.throughput")


class StageWaits:
    def __init__(self, report_every_s: float = 10.0) -> None:
        self._lock = threading.Lock()
        self._waited: dict[str, float] = {}
        self._completed = 0
        self._window_start = time.monotonic()
        self._report_every_s = report_every_s

    def waited(self, stage: str, seconds: float) -> None:
        metrics.STAGE_WAIT_SECONDS.labels(stage=stage).observe(seconds)
        with self._lock:
            self._waited[stage] = self._waited.get(stage, 0.0) + seconds

    def completed(self, count: int) -> None:
        with self._lock:
            self._completed += count

    def report_if_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            elapsed = now - self._window_start
            if elapsed < self._report_every_s:
                return
            waited, completed = self._waited, self._completed
            self._waited, self._completed, self._window_start = {}, 0, now
        shares = {stage: round(seconds / elapsed, 3) for stage, seconds in sorted(waited.items())}
        log.info("throughput", images_per_s=round(completed / elapsed, 2), wait_share=shares,
                 window_s=round(elapsed, 1))
