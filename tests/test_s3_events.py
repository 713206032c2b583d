"""S3 event notifications -> requests, on payloads shaped exactly as AWS and MinIO send them."""

from __future__ import annotations

import json

import pytest

from consumers.intake import parse_request
from pipeline.errors import RequestError
from schemas.s3_events import (
    INVALID_EVENT_CODE,
    is_s3_event,
    parse_s3_event,
    requests_from_s3_event,
    s3_request_id,
)

# As documented for S3 event notifications (event structure version 2.1): no "s3:"
# prefix on the event name, the key URL-encoded with '+' for spaces.
AWS_PUT = """{
  "Records": [
    {
      "eventVersion": "2.1",
      "eventSource": "aws:s3",
      "awsRegion": "eu-west-1",
      "eventTime": "2025-03-14T09:26:53.589Z",
      "eventName": "ObjectCreated:Put",
      "userIdentity": {"principalId": "AWS:AIDAJDPLRKLG7UEXAMPLE"},
      "requestParameters": {"sourceIPAddress": "203.0.113.15"},
      "responseElements": {
        "x-amz-request-id": "C3D13FE58DE4C810",
        "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD"
      },
      "s3": {
        "s3SchemaVersion": "1.0",
        "configurationId": "labelstream-incoming",
        "bucket": {
          "name": "acme-uploads",
          "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
          "arn": "arn:aws:s3:::acme-uploads"
        },
        "object": {
          "key": "photos/2025/summer+holiday/beach+day+1.jpg",
          "size": 2483721,
          "eTag": "d41d8cd98f00b204e9800998ecf8427e",
          "versionId": "096fKKXTRTtl3on89fVO.nfljtsv6qko",
          "sequencer": "0055AED6DCD90281E5"
        }
      }
    }
  ]
}"""

# MinIO's Kafka target: the records wrapped with EventName and Key ("bucket/key",
# decoded); record keys are escaped with Go's url.QueryEscape, '/' included.
MINIO_PUT = """{
  "EventName": "s3:ObjectCreated:Put",
  "Key": "incoming/café/日本 1.jpg",
  "Records": [
    {
      "eventVersion": "2.0",
      "eventSource": "minio:s3",
      "awsRegion": "",
      "eventTime": "2025-04-23T10:15:02.114Z",
      "eventName": "s3:ObjectCreated:Put",
      "userIdentity": {"principalId": "minioadmin"},
      "requestParameters": {"principalId": "minioadmin", "region": "", "sourceIPAddress": "172.18.0.1"},
      "responseElements": {
        "x-amz-id-2": "dd9025bab4ad464b049177c95eb6ebf374d3b3fd1af9251148b658df7ac2e3e8",
        "x-amz-request-id": "18391F2F4A3C2A65",
        "x-minio-deployment-id": "4b5c8f4e-2a8c-4c1f-9d7e-6f0a1b2c3d4e",
        "x-minio-origin-endpoint": "http://172.18.0.3:9000"
      },
      "s3": {
        "s3SchemaVersion": "1.0",
        "configurationId": "Config",
        "bucket": {
          "name": "incoming",
          "ownerIdentity": {"principalId": "minioadmin"},
          "arn": "arn:aws:s3:::incoming"
        },
        "object": {
          "key": "caf%C3%A9%2F%E6%97%A5%E6%9C%AC+1.jpg",
          "size": 48213,
          "eTag": "5fc7298143efe1276d39a3466d4e255f",
          "contentType": "image/jpeg",
          "userMetadata": {"content-type": "image/jpeg"},
          "sequencer": "18391F2F4B0E8D21"
        }
      },
      "source": {"host": "172.18.0.1", "port": "", "userAgent": "MinIO (linux; amd64) minio-go/v7.0.90 mc/RELEASE.2025-04-16T18-13-26Z"}
    }
  ]
}"""

# Sent by S3 once, when a notification configuration is saved.
AWS_TEST_EVENT = """{
  "Service": "Amazon S3",
  "Event": "s3:TestEvent",
  "Time": "2025-03-14T09:20:00.000Z",
  "Bucket": "acme-uploads",
  "RequestId": "5582815E1AEA5ADF",
  "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE"
}"""


def aws_record(event_name: str, key: str, version_id: str | None = None) -> dict:
    record = json.loads(AWS_PUT)["Records"][0]
    record["eventName"] = event_name
    record["s3"]["object"]["key"] = key
    if version_id is None:
        del record["s3"]["object"]["versionId"]
    else:
        record["s3"]["object"]["versionId"] = version_id
    return record


def test_aws_put_becomes_one_request_with_the_decoded_key_and_version() -> None:
    result = requests_from_s3_event(json.loads(AWS_PUT))
    assert result.skipped == 0
    [request] = result.requests
    assert request.image.s3 is not None
    assert request.image.s3.bucket == "acme-uploads"
    assert request.image.s3.key == "photos/2025/summer holiday/beach day 1.jpg"
    assert request.image.s3.version_id == "096fKKXTRTtl3on89fVO.nfljtsv6qko"
    assert request.id == "s3://acme-uploads/photos/2025/summer holiday/beach day 1.jpg?versionId=096fKKXTRTtl3on89fVO.nfljtsv6qko"
    assert request.taxonomy is None
    assert request.metadata == {
        "s3_event": {
            "name": "ObjectCreated:Put",
            "time": "2025-03-14T09:26:53.589Z",
            "source": "aws:s3",
            "region": "eu-west-1",
            "etag": "d41d8cd98f00b204e9800998ecf8427e",
            "size": 2483721,
            "sequencer": "0055AED6DCD90281E5",
        }
    }


def test_minio_kafka_payload_decodes_percent_encoded_utf8_and_slashes() -> None:
    result = requests_from_s3_event(json.loads(MINIO_PUT))
    [request] = result.requests
    assert request.image.s3 is not None
    assert request.image.s3.bucket == "incoming"
    assert request.image.s3.key == "café/日本 1.jpg"
    # The wrapper's Key is "bucket/key" already decoded: both must agree.
    assert json.loads(MINIO_PUT)["Key"] == f"incoming/{request.image.s3.key}"
    assert request.image.s3.version_id is None
    assert request.id == "s3://incoming/café/日本 1.jpg"
    assert request.metadata["s3_event"]["name"] == "s3:ObjectCreated:Put"
    assert request.metadata["s3_event"]["content_type"] == "image/jpeg"
    # MinIO sends an empty region; it is left out rather than kept as "".
    assert "region" not in request.metadata["s3_event"]


def test_an_encoded_plus_stays_a_plus_while_a_bare_plus_is_a_space() -> None:
    document = {"Records": [aws_record("ObjectCreated:Put", "a%2Bb+c.jpg")]}
    [request] = requests_from_s3_event(document).requests
    assert request.image.s3 is not None and request.image.s3.key == "a+b c.jpg"


@pytest.mark.parametrize("event_name", ["ObjectCreated:Put", "s3:ObjectCreated:Put", "ObjectCreated:Post",
                                        "ObjectCreated:Copy", "s3:ObjectCreated:CompleteMultipartUpload"])
def test_every_content_creating_event_name_is_accepted_with_or_without_the_s3_prefix(event_name: str) -> None:
    result = requests_from_s3_event({"Records": [aws_record(event_name, "x.jpg")]})
    assert len(result.requests) == 1 and result.skipped == 0


def test_other_records_are_skipped_and_reported() -> None:
    document = {
        "Records": [
            aws_record("ObjectCreated:Put", "one.jpg", "v1"),
            aws_record("ObjectRemoved:Delete", "two.jpg"),
            aws_record("s3:ObjectCreated:PutTagging", "one.jpg", "v1"),
            aws_record("s3:ObjectAccessed:Get", "one.jpg"),
            aws_record("ObjectCreated:CompleteMultipartUpload", "big+one.jpg", "v7"),
        ]
    }
    result = requests_from_s3_event(document)
    assert [r.image.s3.key for r in result.requests if r.image.s3] == ["one.jpg", "big one.jpg"]
    assert result.skipped == 3
    assert result.skipped_events == ("ObjectRemoved:Delete", "s3:ObjectCreated:PutTagging", "s3:ObjectAccessed:Get")


def test_the_aws_test_event_yields_nothing_and_counts_as_skipped() -> None:
    document = json.loads(AWS_TEST_EVENT)
    assert is_s3_event(document)
    result = requests_from_s3_event(document)
    assert result.requests == () and result.skipped_events == ("s3:TestEvent",)


def test_ids_are_deterministic_and_distinguish_versions() -> None:
    first = requests_from_s3_event(json.loads(AWS_PUT)).requests[0]
    again = requests_from_s3_event(json.loads(AWS_PUT)).requests[0]
    other = requests_from_s3_event({"Records": [aws_record("ObjectCreated:Put", first.image.s3.key, "v2")]})
    assert first.id == again.id
    assert other.requests[0].id != first.id


def test_an_id_longer_than_a_request_allows_is_hashed_deterministically() -> None:
    key = "deep/" * 150 + "photo.jpg"
    [request] = requests_from_s3_event({"Records": [aws_record("ObjectCreated:Put", key, "v1")]}).requests
    assert request.image.s3 is not None and request.image.s3.key == key
    assert request.id.startswith("s3-sha256:") and len(request.id) == len("s3-sha256:") + 64
    assert request.id == s3_request_id("acme-uploads", key, "v1")
    assert request.id != s3_request_id("acme-uploads", key, "v2")


def test_requests_pass_the_workers_own_request_parser() -> None:
    for payload in (AWS_PUT, MINIO_PUT):
        for request in requests_from_s3_event(json.loads(payload)).requests:
            assert parse_request(request.model_dump_json().encode("utf-8"), 1024) == request


def test_a_taxonomy_can_be_given_for_every_request() -> None:
    [request] = requests_from_s3_event(json.loads(MINIO_PUT), taxonomy="everyday").requests
    assert request.taxonomy == "everyday"


def test_a_plain_request_is_not_an_s3_event() -> None:
    plain = {"id": "a", "image": {"s3": {"bucket": "abc", "key": "k"}}}
    assert not is_s3_event(plain)
    assert not is_s3_event([{"Records": []}])
    with pytest.raises(RequestError) as raised:
        parse_s3_event(plain)
    assert raised.value.code == INVALID_EVENT_CODE


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda d: d.update(Records="nope"), id="records-not-a-list"),
        pytest.param(lambda d: d["Records"][0]["s3"].pop("bucket"), id="no-bucket"),
        pytest.param(lambda d: d["Records"][0]["s3"]["object"].pop("key"), id="no-key"),
        pytest.param(lambda d: d["Records"][0].pop("eventName"), id="no-event-name"),
        pytest.param(lambda d: d["Records"][0]["s3"]["bucket"].update(name="ab"), id="bucket-name-too-short"),
        pytest.param(lambda d: d["Records"][0]["s3"]["object"].update(key="k" * 1025), id="key-too-long"),
    ],
)
def test_malformed_notifications_raise_a_request_error_with_a_stable_code(breakage) -> None:  # type: ignore[no-untyped-def]
    document = json.loads(AWS_PUT)
    breakage(document)
    with pytest.raises(RequestError) as raised:
        requests_from_s3_event(document)
    assert raised.value.code == INVALID_EVENT_CODE
    assert raised.value.stage == "validate"
