"""What travels between the worker's threads: one input and how it ended."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.classifier import ZeroShotClassifier
from pipeline.errors import LabelstreamError
from pipeline.labeler import ImageLabels, PreparedImage
from consumers.offsets import Ticket
from schemas.requests import Request


@dataclass
class WorkItem:
    ticket: Ticket
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None
    headers: list[tuple[str, bytes]]
    log: Any
    received: float = field(default_factory=time.perf_counter)
    request: Request | None = None
    classifier: ZeroShotClassifier | None = None
    prepared: PreparedImage | None = None

    @property
    def request_id(self) -> str | None:
        return self.request.id if self.request else None


@dataclass(frozen=True)
class Outcome:
    """Exactly one per input: labels, or the error that stopped it."""

    item: WorkItem
    labels: ImageLabels | None = None
    error: LabelstreamError | None = None
    attempts: int = 1
    # The labels came from the content-hash cache: no decode, no model call.
    cache_hit: bool = False

    def total_ms(self) -> float:
        return (time.perf_counter() - self.item.received) * 1000.0
