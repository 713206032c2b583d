"""S3 event notifications as requests: what MinIO's Kafka target and AWS-to-Kafka bridges publish.

Three shapes are accepted, all carrying the standard `Records` list:
  AWS:   {"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {...}, "object": {...}}}]}
  MinIO: the same records with "s3:"-prefixed event names, wrapped as
         {"EventName": "s3:ObjectCreated:Put", "Key": "bucket/key", "Records": [...]}
  AWS's s3:TestEvent, sent once when a notification is configured, with no records.

Object keys arrive URL-encoded the way S3 encodes them (a space as '+',
non-ASCII as percent-encoded UTF-8), so they are decoded with unquote_plus.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.errors import RequestError
from schemas.requests import ImageSource, Request, S3Source

INVALID_EVENT_CODE = "request.s3_event_invalid"
TEST_EVENT = "s3:TestEvent"
# Under ObjectCreated in MinIO, yet they change only an object's metadata, not its bytes:
# labelling again would repeat work already done for the Put that created it.
METADATA_ONLY_EVENTS = frozenset({"PutRetention", "PutLegalHold", "PutTagging", "DeleteTagging"})
MAX_ID_LENGTH = 256


class _EventPart(BaseModel):
    # Real notifications carry many more fields (identities, request ids); only these matter here.
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class S3EventBucket(_EventPart):
    name: str = Field(min_length=1)
    arn: str | None = None


class S3EventObject(_EventPart):
    key: str = Field(min_length=1)
    size: int | None = Field(None, ge=0)
    etag: str | None = Field(None, alias="eTag")
    version_id: str | None = Field(None, alias="versionId")
    sequencer: str | None = None
    content_type: str | None = Field(None, alias="contentType")

    @field_validator("version_id")
    @classmethod
    def _empty_means_unversioned(cls, value: str | None) -> str | None:
        return value or None


class S3EventEntity(_EventPart):
    bucket: S3EventBucket
    object: S3EventObject


class S3EventRecord(_EventPart):
    event_name: str = Field(alias="eventName", min_length=1)
    event_time: str | None = Field(None, alias="eventTime")
    event_source: str | None = Field(None, alias="eventSource")
    aws_region: str | None = Field(None, alias="awsRegion")
    s3: S3EventEntity

    @property
    def event_type(self) -> str:
        """The name without MinIO's "s3:" prefix, e.g. "ObjectCreated:Put" from either source."""
        return self.event_name.removeprefix("s3:")

    @property
    def creates_content(self) -> bool:
        category, _, action = self.event_type.partition(":")
        return category == "ObjectCreated" and action not in METADATA_ONLY_EVENTS

    @property
    def key(self) -> str:
        return unquote_plus(self.s3.object.key)


class S3EventNotification(_EventPart):
    records: list[S3EventRecord] = Field(default_factory=list, alias="Records")
    # MinIO's Kafka target wrapper; informational (the records say the same, per record).
    wrapper_event_name: str | None = Field(None, alias="EventName")
    wrapper_key: str | None = Field(None, alias="Key")
    # AWS's test message: {"Service": "Amazon S3", "Event": "s3:TestEvent", ...}
    test_event: str | None = Field(None, alias="Event")


@dataclass(frozen=True)
class S3EventRequests:
    """One request per ObjectCreated record; the other records' event names in `skipped_events`."""

    requests: tuple[Request, ...]
    skipped_events: tuple[str, ...]

    @property
    def skipped(self) -> int:
        return len(self.skipped_events)


def is_s3_event(document: Any) -> bool:
    """True for an S3 notification; a labelstream Request can never look like one (it forbids extra keys)."""
    return isinstance(document, dict) and ("Records" in document or document.get("Event") == TEST_EVENT)


def parse_s3_event(document: Any) -> S3EventNotification:
    if not is_s3_event(document):
        raise RequestError("not an S3 event notification: no Records", code=INVALID_EVENT_CODE)
    try:
        return S3EventNotification.model_validate(document)
    except ValidationError as exc:
        raise RequestError(f"S3 event notification does not match the standard shape: {_summarise(exc)}",
                           code=INVALID_EVENT_CODE) from exc


def requests_from_s3_event(document: Any, taxonomy: str | None = None) -> S3EventRequests:
    """Turn a notification into requests. Raises RequestError (request.s3_event_invalid) when malformed."""
    notification = parse_s3_event(document)
    created = [record for record in notification.records if record.creates_content]
    skipped = [record.event_name for record in notification.records if not record.creates_content]
    if notification.test_event and not notification.records:
        skipped.append(notification.test_event)
    return S3EventRequests(tuple(request_from_record(r, taxonomy) for r in created), tuple(skipped))


def request_from_record(record: S3EventRecord, taxonomy: str | None = None) -> Request:
    bucket, key, version = record.s3.bucket.name, record.key, record.s3.object.version_id
    try:
        return Request(
            id=s3_request_id(bucket, key, version),
            image=ImageSource(s3=S3Source(bucket=bucket, key=key, version_id=version)),
            taxonomy=taxonomy,
            metadata={"s3_event": _event_metadata(record)},
        )
    except ValidationError as exc:
        raise RequestError(f"S3 event record names an unusable object: {_summarise(exc)}",
                           code=INVALID_EVENT_CODE) from exc


def s3_request_id(bucket: str, key: str, version_id: str | None) -> str:
    """"s3://bucket/key?versionId=v": the same object version always gets the same id.

    Longer than a request id may be (keys reach 1024 bytes): its SHA-256 instead.
    """
    uri = f"s3://{bucket}/{key}" + (f"?versionId={version_id}" if version_id else "")
    if len(uri) <= MAX_ID_LENGTH:
        return uri
    return "s3-sha256:" + hashlib.sha256(uri.encode("utf-8")).hexdigest()


def _event_metadata(record: S3EventRecord) -> dict[str, Any]:
    obj = record.s3.object
    fields = {
        "name": record.event_name,
        "time": record.event_time,
        "source": record.event_source,
        "region": record.aws_region or None,
        "etag": obj.etag,
        "size": obj.size,
        "sequencer": obj.sequencer,
        "content_type": obj.content_type,
    }
    return {name: value for name, value in fields.items() if value is not None}


def _summarise(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors(include_url=False)
    )
