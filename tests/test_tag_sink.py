"""The S3 object-tag sink: a real `labelstream run` tagging real moto S3 objects, and the sink on its own.

What is proved: the top labels and the marker land on each S3 source object,
merged with the tags already there (the owner's are never dropped, this
taxonomy's stale ones are replaced, another taxonomy's are kept), cleaned and
cut to S3's limits, with every drop counted; inline images are labelled but
not tagged; a redelivery writes exactly the same tags; a deleted object is
counted and skipped, while an unreachable S3 holds the checkpoint back.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import yaml
from kafka import TopicPartition
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from consumers.offsets import Ticket
from consumers.records import Outcome, WorkItem
from consumers.tag_sink import ObjectTagSink
from pipeline import metrics
from pipeline.config import RetrySettings, S3Settings, TagSinkSettings
from pipeline.errors import PublishError
from pipeline.fetch import build_s3_client
from pipeline.labeler import ImageLabels
from pipeline.object_tags import MAX_KEY_CHARS, MAX_TAGS, MAX_VALUE_CHARS, clean_tag_text, label_key, marker_key
from schemas.labels import TaxonomyRef
from schemas.requests import Request
from tests.worker_process import OutputCollector, produce, start_worker, true_end_offsets, wait_for_commits

# Every class name carries characters S3 rejects, so whichever the model ranks first, cleaning shows.
OBJECTS = ["chien #1", "chat (félin)", "fleur*", "tissu/étoffe", "rue & ville"]
LONG_NAME = "moderation-" + "x" * 115  # 126 characters: the label keys must be cut to fit 128
MODERATION = ["safe", "weapons", "violence"]
TIMEOUT_S = 120.0


def user_tags(count: int) -> dict[str, str]:
    return {f"owner-{i}": f"team {i}" for i in range(count)}


# Object key -> the tags it carries before the worker runs.
OBJECTS_BEFORE = {
    "plain.jpg": {},
    "two.jpg": user_tags(2),
    "eight.jpg": user_tags(8),
    "ten.jpg": user_tags(10),
    "stale.jpg": {"owner": "me", "labelstream:objects": "old-version", "labelstream:objects:top1": "stale",
                  "labelstream:objects:top3": "stale", "labelstream:other": "o1", "labelstream:other:top1": "kept"},
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def write_taxonomies(folder: Path) -> list[str]:
    paths = []
    for name, classes in (("objects", OBJECTS), (LONG_NAME, MODERATION)):
        path = folder / f"{name[:20]}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "top_k": 3, "templates": ["a photo of a {}."], "classes": classes}))
        paths.append(str(path))
    return paths


def jpeg(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (shade, 120, 200 - shade)).save(buffer, format="JPEG")
    return buffer.getvalue()


def get_tags(s3_client: Any, bucket: str, key: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in s3_client.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]}


def requests_for(bucket: str, uid: str) -> list[tuple[int, bytes, bytes]]:
    values = [{"id": f"{uid}-{key}", "image": {"s3": {"bucket": bucket, "key": key}}, "taxonomy": "objects"}
              for key in OBJECTS_BEFORE]
    # A second taxonomy on the same object, in the same batch: both must end up on it.
    values.append({"id": f"{uid}-two-mod", "image": {"s3": {"bucket": bucket, "key": "two.jpg"}}, "taxonomy": LONG_NAME})
    values.append({"id": f"{uid}-inline", "image": {"base64": base64.b64encode(jpeg(7)).decode()}, "taxonomy": "objects"})
    return [(i % 2, v["id"].encode(), json.dumps(v).encode()) for i, v in enumerate(values)]


def expected_ours(label: dict[str, Any], max_labels: int) -> dict[str, str]:
    name = label["taxonomy"]["name"]
    tags = {marker_key(name): label["taxonomy"]["version"]}
    for rank, entry in enumerate(label["labels"][:max_labels], start=1):
        tags[label_key(name, rank)] = clean_tag_text(entry["label"], MAX_VALUE_CHARS)
    return tags


def counter(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return f"labelstream_{name}_total", tuple(sorted(labels.items()))


def assert_s3_limits(tags: dict[str, str]) -> None:
    assert len(tags) <= MAX_TAGS
    assert all(len(k) <= MAX_KEY_CHARS and len(v) <= MAX_VALUE_CHARS for k, v in tags.items())


@pytest.mark.timeout(300)
def test_worker_tags_source_objects_merged_within_limits_and_idempotently(
    broker: Any, s3_client: Any, new_bucket: Callable[[], str], new_topic: Callable[..., str],
    unique_id: str, worker_env: Callable[..., dict[str, str]], tmp_path: Path,
) -> None:
    bucket = new_bucket()
    for shade, (key, tags) in enumerate(OBJECTS_BEFORE.items()):
        s3_client.put_object(Bucket=bucket, Key=key, Body=jpeg(shade * 30),
                             Tagging="&".join(f"{k}={v}".replace(" ", "+") for k, v in tags.items()))
        assert get_tags(s3_client, bucket, key) == tags
    topics = {name: new_topic(2 if name == "requests" else 1) for name in
              ("requests", "labels", "embeddings", "dlq", "taxonomies")}
    group, port = f"tags-{unique_id}", free_port()
    env = worker_env(
        LABELSTREAM_TOPICS__REQUESTS=topics["requests"], LABELSTREAM_TOPICS__LABELS=topics["labels"],
        LABELSTREAM_TOPICS__EMBEDDINGS=topics["embeddings"], LABELSTREAM_TOPICS__DLQ=topics["dlq"],
        LABELSTREAM_TOPICS__TAXONOMIES=topics["taxonomies"], LABELSTREAM_KAFKA__GROUP_ID=group,
        LABELSTREAM_TAXONOMY__FILES=json.dumps(write_taxonomies(tmp_path)),
        LABELSTREAM_SINKS__TAGS__ENABLED="true", LABELSTREAM_SINKS__TAGS__MAX_LABELS="3",
        LABELSTREAM_METRICS__PORT=str(port),
    )
    messages = requests_for(bucket, unique_id)
    collector = OutputCollector(broker.bootstrap, topics["labels"])
    worker = start_worker(env, tmp_path, "tagger")
    try:
        produced = produce(broker.bootstrap, topics["requests"], messages)
        assert collector.read_until(lambda got: len(got) >= len(messages), TIMEOUT_S, worker.assert_alive), worker.tail()
        wait_for_commits(broker.bootstrap, group, true_end_offsets(topics["requests"], produced), 30, worker.assert_alive)
        first = {key: get_tags(s3_client, bucket, key) for key in OBJECTS_BEFORE}
        first_metrics = scrape(port)

        # Redelivery: the same requests again (as after a crash before the commit).
        produced += produce(broker.bootstrap, topics["requests"], messages)
        assert collector.read_until(lambda got: len(got) >= 2 * len(messages), TIMEOUT_S, worker.assert_alive)
        wait_for_commits(broker.bootstrap, group, true_end_offsets(topics["requests"], produced), 30, worker.assert_alive)
        second = {key: get_tags(s3_client, bucket, key) for key in OBJECTS_BEFORE}
        second_metrics = scrape(port)
        assert worker.stop(60) == 0, worker.tail()
    finally:
        worker.kill()
        collector.close()

    labels = {json.loads(r.value)["id"]: json.loads(r.value) for r in collector.on(topics["labels"])}
    def objects(key: str) -> dict[str, str]:
        return expected_ours(labels[f"{unique_id}-{key}"], 3)

    moderation = expected_ours(labels[f"{unique_id}-two-mod"], 3)
    assert first["plain.jpg"] == objects("plain.jpg")
    assert first["two.jpg"] == {**user_tags(2), **objects("two.jpg"), **moderation}
    assert all(len(k) <= MAX_KEY_CHARS for k in moderation) and any(len(k) == MAX_KEY_CHARS for k in moderation)
    top1 = label_key("objects", 1)
    assert first["eight.jpg"] == {**user_tags(8), marker_key("objects"): labels[f"{unique_id}-eight.jpg"]["taxonomy"]["version"],
                                  top1: objects("eight.jpg")[top1]}
    assert first["ten.jpg"] == user_tags(10)
    assert first["stale.jpg"] == {"owner": "me", "labelstream:other": "o1", "labelstream:other:top1": "kept",
                                  **objects("stale.jpg")}
    assert "stale" not in first["stale.jpg"].values()
    for tags in first.values():
        assert_s3_limits(tags)
    assert any("_" in value for key, value in first["plain.jpg"].items() if key != marker_key("objects"))

    assert second == first, "a redelivered request changed the tags"
    delta = {key: second_metrics.get(key, 0.0) - first_metrics.get(key, 0.0) for key in second_metrics}
    for run in (first_metrics, delta):
        assert run[counter("object_tag_writes", result="not_s3")] == 1
        # eight.jpg: top2 and top3; ten.jpg: top1 to top3, and the marker.
        assert run[counter("object_tags_dropped", reason="tag_limit")] == 5
        assert run[counter("object_tags_dropped", reason="marker_no_room")] == 1
        assert run[counter("object_tags_dropped", reason="key_truncated")] == 1
        assert run[counter("object_tags_dropped", reason="chars_replaced")] >= 5 * 3
    assert first_metrics[counter("object_tag_writes", result="written")] == 5
    assert delta[counter("object_tag_writes", result="unchanged")] == 6


def labelled_outcome(request: Request, taxonomy: str = "objects") -> Outcome:
    item = WorkItem(ticket=Ticket(TopicPartition("requests", 0), 0, 1), topic="requests", partition=0, offset=0,
                    key=None, value=None, timestamp_ms=None, headers=[], log=structlog.get_logger(), request=request)
    labels = ImageLabels(embedding=np.zeros(4, dtype=np.float32), labels=[("dog", 0.9)],
                         taxonomy=TaxonomyRef(name=taxonomy, version="v1"), infer_ms=1.0)
    return Outcome(item, labels=labels)


def s3_request(rid: str, bucket: str, key: str) -> Request:
    return Request.model_validate({"id": rid, "image": {"s3": {"bucket": bucket, "key": key}}})


def test_a_deleted_object_is_counted_and_skipped_but_an_unreachable_s3_holds_the_checkpoint(
    s3_server: Any, s3_client: Any, new_bucket: Callable[[], str],
) -> None:
    bucket = new_bucket()
    s3_client.put_object(Bucket=bucket, Key="here.jpg", Body=jpeg(1))
    retry = RetrySettings(initial_backoff_ms=10, max_backoff_ms=50)
    sink = ObjectTagSink(TagSinkSettings(enabled=True), build_s3_client(S3Settings(endpoint_url=s3_server.endpoint_url)),
                         retry, wait_s=5.0)
    not_found = metrics.OBJECT_TAG_WRITES.labels(result="not_found")
    written = metrics.OBJECT_TAG_WRITES.labels(result="written")
    before_missing, before_written = not_found._value.get(), written._value.get()
    with structlog.testing.capture_logs() as logs:
        sink.write([labelled_outcome(s3_request("a", bucket, "gone.jpg")), labelled_outcome(s3_request("b", bucket, "here.jpg"))])
    assert not_found._value.get() - before_missing == 1
    assert written._value.get() - before_written == 1
    assert [e["code"] for e in logs if e["event"] == "object_tag_failed"] == ["s3.not_found"]
    assert get_tags(s3_client, bucket, "here.jpg") == {"labelstream:objects": "v1", "labelstream:objects:top1": "dog"}
    sink.close()

    nowhere = ObjectTagSink(TagSinkSettings(enabled=True),
                            build_s3_client(S3Settings(endpoint_url=f"http://127.0.0.1:{free_port()}", connect_timeout_s=0.5)),
                            retry, wait_s=1.0)
    started = time.monotonic()
    with pytest.raises(PublishError) as raised:
        nowhere.write([labelled_outcome(s3_request("c", bucket, "here.jpg"))])
    assert raised.value.retryable and raised.value.code == "s3.connection_error"
    assert time.monotonic() - started < 10, "the checkpoint must not wait on S3 longer than its budget"
    nowhere.close()
