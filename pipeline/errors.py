"""The one exception hierarchy.

Every failure an input can meet carries a stable `code` (what dashboards and
dead-letter consumers key on), the `stage` it happened in, and whether a retry
can help. Messages are for humans and may change; codes may not.
"""

from __future__ import annotations

from typing import Literal

Stage = Literal["parse", "validate", "fetch", "decode", "infer", "publish", "config", "taxonomy"]


class LabelstreamError(Exception):
    """Base of every error labelstream raises on purpose."""

    code: str = "internal.error"
    stage: Stage = "infer"
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        stage: Stage | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if stage is not None:
            self.stage = stage
        if retryable is not None:
            self.retryable = retryable

    def as_dict(self) -> dict[str, object]:
        return {"code": self.code, "stage": self.stage, "retryable": self.retryable, "message": self.message}

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class RequestError(LabelstreamError):
    """The Kafka message itself is unusable: not JSON, wrong shape, bad id."""

    code = "request.invalid"
    stage = "validate"


class FetchError(LabelstreamError):
    """The image bytes could not be read from S3, a URL or the inline payload."""

    code = "fetch.failed"
    stage = "fetch"


class ImageError(LabelstreamError):
    """The bytes were read but are not an image we accept."""

    code = "image.invalid"
    stage = "decode"


class InferenceError(LabelstreamError):
    """The model failed on a batch."""

    code = "infer.failed"
    stage = "infer"
    retryable = True


class TaxonomyError(LabelstreamError):
    """A taxonomy file is malformed, or a request names an unknown taxonomy."""

    code = "taxonomy.invalid"
    stage = "taxonomy"


class ConfigError(LabelstreamError):
    """The worker's configuration is unusable; raised at start-up only."""

    code = "config.invalid"
    stage = "config"


class PublishError(LabelstreamError):
    """The broker did not acknowledge an output record."""

    code = "kafka.publish_failed"
    stage = "publish"
    retryable = True
