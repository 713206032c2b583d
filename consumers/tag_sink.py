"""Writing labels back onto source objects as S3 object tags.

For each labelled request whose image came from S3: GetObjectTagging, merge
(pipeline/object_tags.py: the object's own tags are kept, this taxonomy's
previous tags replaced, S3's limits respected), PutObjectTagging when
anything changed. Objects are tagged concurrently on a small pool; the
requests of one object in a batch are merged in one task, so two taxonomies
labelling the same object never overwrite each other's tags.

Transient S3 failures are retried with the usual backoff for as long as the
checkpoint may wait; past that `write` raises a retryable PublishError and the
checkpoint runs again later (nothing is committed meanwhile). Permanent ones
(object deleted, access denied) are logged and counted, and the label record
goes out regardless. GetObjectTagging and PutObjectTagging are not atomic: a
tag the owner adds between the two calls can be lost.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog

from consumers.records import Outcome
from consumers.sinks import s3_errors
from pipeline import metrics
from pipeline.config import RetrySettings, TagSinkSettings
from pipeline.errors import LabelstreamError, PublishError
from pipeline.object_tags import labelstream_tags, merge_tags
from pipeline.retry import RetryOutcome, call_with_retries
from schemas.requests import S3Source

log = structlog.get_logger("labelstream.tag_sink")

# PublishError code -> the `result` label of labelstream_object_tag_writes_total.
_PERMANENT_RESULTS = {"s3.not_found": "not_found", "s3.bucket_not_found": "not_found", "s3.access_denied": "access_denied"}


@dataclass(frozen=True)
class _ObjectRef:
    bucket: str
    key: str
    version_id: str | None

    def location(self) -> dict[str, str]:
        where = {"Bucket": self.bucket, "Key": self.key}
        if self.version_id:
            where["VersionId"] = self.version_id
        return where

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" + (f"?versionId={self.version_id}" if self.version_id else "")


class ObjectTagSink:
    def __init__(self, settings: TagSinkSettings, s3_client: Any, retry: RetrySettings, wait_s: float) -> None:
        self._settings = settings
        self._s3 = s3_client
        self._retry = retry
        self._wait_s = wait_s
        self._pool = ThreadPoolExecutor(settings.threads, thread_name_prefix="object-tags")
        # Objects already tagged for outcomes of a checkpoint that then failed: not tagged again on its retry.
        self._done: set[tuple[object, str]] = set()

    def write(self, outcomes: list[Outcome]) -> None:
        """Tag the source object of every labelled S3 request in `outcomes`.

        Raises a retryable PublishError when a transient failure outlasts the wait.
        """
        deadline = time.monotonic() + self._wait_s
        groups = self._by_object(outcomes)
        futures = [self._pool.submit(self._tag_object, ref, group, deadline) for ref, group in groups.items()]
        failures = [error for future in futures if (error := future.result()) is not None]
        if failures:
            raise PublishError(
                f"object tags: {len(failures)} of {len(futures)} objects not tagged yet: {failures[0].message}",
                code=failures[0].code, retryable=True,
            )
        self._done.clear()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _by_object(self, outcomes: list[Outcome]) -> dict[_ObjectRef, list[Outcome]]:
        groups: dict[_ObjectRef, list[Outcome]] = {}
        for outcome in outcomes:
            request = outcome.item.request
            if outcome.labels is None or request is None or _done_key(outcome) in self._done:
                continue
            if self._settings.taxonomies and outcome.labels.taxonomy.name not in self._settings.taxonomies:
                continue
            if request.image.s3 is None:
                metrics.OBJECT_TAG_WRITES.labels(result="not_s3").inc()
                continue
            groups.setdefault(_object_ref(request.image.s3), []).append(outcome)
        return groups

    def _tag_object(self, ref: _ObjectRef, group: list[Outcome], deadline: float) -> PublishError | None:
        """Merge and write one object's tags; the error to raise if it is still failing at the deadline."""
        budget = max(deadline - time.monotonic(), 0.001)
        try:
            (result, dropped), _ = call_with_retries(
                lambda: self._merge_and_put(ref, group), self._retry.model_copy(update={"budget_s": budget})
            )
        except RetryOutcome as stopped:
            return self._failed(ref, group, stopped.error)
        except Exception as exc:  # noqa: BLE001 - a bug here must not vanish; retried like a transient failure
            log.exception("object_tag_unexpected", object=str(ref))
            return PublishError(f"{ref}: unexpected {type(exc).__name__}: {exc}", code="s3.error")
        metrics.OBJECT_TAG_WRITES.labels(result=result).inc(len(group))
        for reason, count in dropped.items():
            metrics.OBJECT_TAGS_DROPPED.labels(reason=reason).inc(count)
        self._done.update(_done_key(o) for o in group)
        return None

    def _merge_and_put(self, ref: _ObjectRef, group: list[Outcome]) -> tuple[str, Counter[str]]:
        with s3_errors(f"GetObjectTagging {ref}"):
            answer = self._s3.get_object_tagging(**ref.location())
        existing = {tag["Key"]: tag["Value"] for tag in answer.get("TagSet", [])}
        tags, dropped = dict(existing), Counter[str]()
        for outcome in group:
            assert outcome.labels is not None
            taxonomy = outcome.labels.taxonomy
            ours = labelstream_tags(taxonomy.name, taxonomy.version, outcome.labels.labels,
                                    self._settings.max_labels, self._settings.min_score)
            merged = merge_tags(tags, ours, taxonomy.name)
            tags = merged.tags
            dropped.update(merged.dropped)
        if tags == existing:
            return "unchanged", dropped
        tag_set = [{"Key": key, "Value": value} for key, value in tags.items()]
        with s3_errors(f"PutObjectTagging {ref}"):
            self._s3.put_object_tagging(**ref.location(), Tagging={"TagSet": tag_set})
        return "written", dropped

    def _failed(self, ref: _ObjectRef, group: list[Outcome], error: LabelstreamError) -> PublishError | None:
        if error.retryable:
            return PublishError(f"{ref}: {error.message}", code=error.code, retryable=True)
        # Deleted, forbidden, malformed: no retry can help, and the labels stand without the tags.
        result = _PERMANENT_RESULTS.get(error.code, "failed")
        metrics.OBJECT_TAG_WRITES.labels(result=result).inc(len(group))
        for outcome in group:
            outcome.item.log.warning("object_tag_failed", object=str(ref), code=error.code, error=error.message)
        self._done.update(_done_key(o) for o in group)
        return None


def _object_ref(source: S3Source) -> _ObjectRef:
    return _ObjectRef(source.bucket, source.key, source.version_id)


def _done_key(outcome: Outcome) -> tuple[object, str]:
    return (outcome.item.ticket, outcome.item.request_id or "")
