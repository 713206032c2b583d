"""The dataset sinks the Checkpoint drives: S3 object tags and the Parquet manifest.

Both are optional (`sinks.tags`, `sinks.manifest`). The Checkpoint calls, in order:
  1. `write_tags(outcomes)` before any output is produced: a failure leaves the
     outcomes unpublished and the whole checkpoint is retried (tags are idempotent);
  2. `stage(outcomes, offsets, ...)` once the outcomes are acknowledged (or, in
     exactly-once mode, inside the transaction before it commits): buffers the
     manifest rows, writes the rolls that are due, and returns the offsets capped
     so no partition is committed past a row that is not in a written file;
  3. `confirm()` after the commit, or `rollback()` after an aborted transaction,
     which makes the redelivered range roll into the same files again.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError, NoCredentialsError, ReadTimeoutError
from kafka import TopicPartition

from consumers.records import Outcome
from pipeline.config import Settings
from pipeline.errors import PublishError
from schemas.labels import ModelRef

if TYPE_CHECKING:  # the sinks import s3_errors from here
    from consumers.manifest_sink import ManifestSink
    from consumers.tag_sink import ObjectTagSink

CommittedLookup = Callable[[TopicPartition], "int | None"]

_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchVersion", "NotFound", "404", "MethodNotAllowed", "405"})
_DENIED = frozenset({"AccessDenied", "AllAccessDisabled", "Forbidden", "403"})
_THROTTLED = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestLimitExceeded"})
_TRANSIENT_BOTOCORE = (BotoConnectionError, HTTPClientError, ReadTimeoutError, NoCredentialsError)


class Sinks:
    def __init__(self, tags: ObjectTagSink | None = None, manifest: ManifestSink | None = None) -> None:
        self.tags = tags
        self.manifest = manifest

    def write_tags(self, outcomes: list[Outcome]) -> None:
        if self.tags is not None:
            self.tags.write(outcomes)

    def stage(
        self,
        outcomes: list[Outcome],
        offsets: dict[TopicPartition, int],
        roll: Collection[TopicPartition] = (),
        committed: CommittedLookup | None = None,
    ) -> dict[TopicPartition, int]:
        """Buffer and roll manifest rows; the offsets that may be committed now."""
        if self.manifest is None:
            return offsets
        return self.manifest.stage(outcomes, offsets, roll, committed)

    def confirm(self) -> None:
        if self.manifest is not None:
            self.manifest.confirm()

    def rollback(self) -> None:
        if self.manifest is not None:
            self.manifest.rollback()

    def forget(self, partitions: list[TopicPartition]) -> None:
        """The partitions are gone (revoked or lost): drop what they buffered; the new owner redoes it."""
        if self.manifest is not None:
            self.manifest.forget(partitions)

    def buffered_rows(self) -> int:
        return 0 if self.manifest is None else self.manifest.buffered_rows()

    def close(self) -> None:
        if self.tags is not None:
            self.tags.close()


def build_sinks(settings: Settings, model: ModelRef) -> Sinks:
    """The sinks `settings.sinks` enables, sharing one S3 client (boto3 clients are thread-safe)."""
    from consumers.manifest_sink import ManifestSink
    from consumers.tag_sink import ObjectTagSink
    from pipeline.fetch import build_s3_client

    config = settings.sinks
    if not (config.tags.enabled or config.manifest.enabled):
        return Sinks()
    client = build_s3_client(settings.s3)
    # A checkpoint may wait on S3 no longer than on the broker: the poll thread must come back.
    wait_s = settings.kafka.ack_wait_s()
    tags = ObjectTagSink(config.tags, client, settings.retry, wait_s) if config.tags.enabled else None
    manifest = None
    if config.manifest.enabled:
        held = max(settings.worker.max_in_flight // 2, 1)
        manifest = ManifestSink(config.manifest, client, settings.retry, wait_s, model, held)
    return Sinks(tags, manifest)


@contextmanager
def s3_errors(what: str) -> Iterator[None]:
    """Turn boto3 failures into PublishError with the same `s3.*` codes the fetch stage uses."""
    try:
        yield
    except ClientError as exc:
        raise client_error(exc, what) from None
    except _TRANSIENT_BOTOCORE as exc:
        raise PublishError(f"{what}: {exc}", code="s3.connection_error", retryable=True) from None
    except BotoCoreError as exc:
        raise PublishError(f"{what}: {exc!r}", code="s3.error", retryable=False) from None


def client_error(exc: ClientError, what: str) -> PublishError:
    error = exc.response.get("Error", {})
    s3_code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    message = f"{what}: {s3_code or status} {error.get('Message', '')}".rstrip()
    if s3_code == "NoSuchBucket":
        return PublishError(message, code="s3.bucket_not_found", retryable=False)
    if s3_code in _NOT_FOUND:
        return PublishError(message, code="s3.not_found", retryable=False)
    if s3_code in _DENIED:
        return PublishError(message, code="s3.access_denied", retryable=False)
    if s3_code in _THROTTLED or status >= 500:
        return PublishError(message, code="s3.unavailable", retryable=True)
    return PublishError(message, code="s3.error", retryable=False)
