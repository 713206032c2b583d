"""`labelstream run` end to end: a real worker process, the Tansu broker, moto S3, the tiny model.

Nothing is mocked. Requests go onto a real topic, the worker subprocess labels
them, and the tests read its outputs and its committed offsets back from the
broker. Expected end offsets come from the producer's RecordMetadata, never
from end_offsets(), which Tansu 0.6.0 gets wrong for multi-record batches.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from PIL import Image

from schemas.deadletter import DeadLetterHeaders
from schemas.embeddings import EmbeddingRecord
from schemas.labels import LabelRecord
from tests.worker_process import (
    WorkerProcess,
    assigned_reader,
    committed_offsets,
    produce,
    read_all,
    start_worker,
    true_end_offsets,
    wait_for_commits,
)

REQUEST_COUNT = 210
PARTITIONS = 3
TAXONOMY_NAME = "e2e-objects"
TAXONOMY_CLASSES = ["dog", "cat", "flower", "textile", "city street"]
TOP_K = 3
EMBED_DIM = 64
LABELS_TIMEOUT_S = 120.0
COMMIT_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
SECOND_RUN_S = 10.0
# The worker's log event for an input that ends without labels ("dead_lettered" since the DLQ landed).
REJECTION_EVENTS = ("rejected", "dead_lettered")


# -- reading outputs back (the worker subprocess and broker helpers live in tests/worker_process.py) --


def read_until(
    reader: KafkaConsumer, done: Callable[[list[ConsumerRecord]], bool], timeout_s: float, worker: WorkerProcess
) -> list[ConsumerRecord]:
    """Read until `done`; fails at once if the worker dies, since nothing more would come."""
    records: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout_s
    while not done(records) and time.monotonic() < deadline:
        worker.assert_alive()
        for batch in reader.poll(timeout_ms=300).values():
            records += batch
    return records


def count_records(bootstrap: str, *topics: str) -> Counter[str]:
    return Counter(record.topic for record in read_all(bootstrap, *topics))


# -- request and taxonomy builders ---------------------------------------------------


def write_taxonomy(folder: Path) -> Path:
    path = folder / "taxonomy.yaml"
    path.write_text(yaml.safe_dump({
        "name": TAXONOMY_NAME,
        "top_k": TOP_K,
        "templates": ["a photo of a {}.", "a close-up photo of a {}."],
        "classes": TAXONOMY_CLASSES,
    }))
    return path


def upload_photos(s3_client: Any, bucket: str, photos: list[Path]) -> list[str]:
    keys = []
    for photo in photos:
        key = f"photos/{photo.name}"
        s3_client.upload_file(str(photo), bucket, key)
        keys.append(key)
    return keys


def s3_request(request_id: str, bucket: str, key: str, **extra: Any) -> bytes:
    return json.dumps({"id": request_id, "image": {"s3": {"bucket": bucket, "key": key}}, **extra}).encode()


def tiny_jpeg_base64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="JPEG", quality=50)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def by_id(records: list[ConsumerRecord]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        document = json.loads(record.value)
        grouped.setdefault(document["id"], []).append(document)
    return grouped


# -- assertions on one output pair ------------------------------------------------


def assert_label_record(document: dict[str, Any], metadata: dict[str, Any], source: dict[str, Any]) -> None:
    LabelRecord.model_validate(document)
    assert document["metadata"] == metadata
    labels = document["labels"]
    assert len(labels) == TOP_K
    scores = [entry["score"] for entry in labels]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert {entry["label"] for entry in labels} <= set(TAXONOMY_CLASSES)
    assert document["taxonomy"]["name"] == TAXONOMY_NAME
    assert document["taxonomy"]["version"]
    assert document["source"] == source
    timings = document["timings_ms"]
    assert {"fetch", "decode", "infer", "total"} <= set(timings)
    assert all(isinstance(timings[k], (int, float)) and timings[k] >= 0 for k in ("fetch", "decode", "infer", "total"))


def assert_embedding_record(document: dict[str, Any]) -> None:
    EmbeddingRecord.model_validate(document)
    assert document["dim"] == EMBED_DIM
    assert document["dtype"] == "float32"
    assert document["encoding"] == "base64"
    raw = base64.b64decode(document["vector"], validate=True)
    assert len(raw) == EMBED_DIM * 4
    vector = np.frombuffer(raw, dtype="<f4")
    assert np.all(np.isfinite(vector))
    assert float(np.linalg.norm(vector.astype(np.float64))) == pytest.approx(1.0, abs=1e-4)


def assert_clean_stop(worker: WorkerProcess) -> None:
    code = worker.stop(STOP_TIMEOUT_S)
    assert code == 0, f"worker exited {code}:\n{worker.tail()}"
    names = {e.get("event") for e in worker.events()}
    assert {"draining", "drained", "stopped"} <= names, worker.tail()


# -- the tests ------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_worker_labels_every_request_once_commits_and_a_restart_reprocesses_nothing(
    broker: Any,
    s3_client: Any,
    new_bucket: Callable[[], str],
    new_topic: Callable[..., str],
    unique_id: str,
    worker_env: Callable[..., dict[str, str]],
    sample_photos: list[Path],
    tmp_path: Path,
) -> None:
    requests_topic, labels_topic, embeddings_topic = new_topic(PARTITIONS), new_topic(PARTITIONS), new_topic(PARTITIONS)
    dlq_topic, taxonomies_topic = new_topic(1), new_topic(1)
    group = f"e2e-{unique_id}"
    bucket = new_bucket()
    keys = upload_photos(s3_client, bucket, sample_photos)
    ids = [f"req-{unique_id}-{i:04d}" for i in range(REQUEST_COUNT)]
    metadata = {rid: {"n": i, "nested": {"a": [1, 2]}} for i, rid in enumerate(ids)}
    produced = produce(broker.bootstrap, requests_topic, (
        (i % PARTITIONS, rid.encode(), s3_request(rid, bucket, keys[i % len(keys)], metadata=metadata[rid]))
        for i, rid in enumerate(ids)
    ))
    assert {p.partition for p in produced} == set(range(PARTITIONS))
    sources = {rid: {"topic": requests_topic, "partition": p.partition, "offset": p.offset}
               for rid, p in zip(ids, produced, strict=True)}
    env = worker_env(
        LABELSTREAM_TOPICS__REQUESTS=requests_topic,
        LABELSTREAM_TOPICS__LABELS=labels_topic,
        LABELSTREAM_TOPICS__EMBEDDINGS=embeddings_topic,
        LABELSTREAM_TOPICS__DLQ=dlq_topic,
        LABELSTREAM_TOPICS__TAXONOMIES=taxonomies_topic,
        LABELSTREAM_KAFKA__GROUP_ID=group,
        LABELSTREAM_TAXONOMY__PATH=str(write_taxonomy(tmp_path)),
    )
    reader = assigned_reader(broker.bootstrap, labels_topic, embeddings_topic)
    first = start_worker(env, tmp_path, "first")
    try:
        outputs = read_until(reader, lambda got: len({(r.topic, r.key) for r in got}) >= 2 * REQUEST_COUNT,
                             LABELS_TIMEOUT_S, first)
        wait_for_commits(broker.bootstrap, group, true_end_offsets(requests_topic, produced), COMMIT_TIMEOUT_S, first.assert_alive)
        assert_clean_stop(first)
    finally:
        first.kill()
        reader.close()

    labels = [r for r in outputs if r.topic == labels_topic]
    embeddings = [r for r in outputs if r.topic == embeddings_topic]
    labels_by_id, embeddings_by_id = by_id(labels), by_id(embeddings)
    assert set(labels_by_id) == set(ids), f"missing labels for {sorted(set(ids) - set(labels_by_id))[:5]}"
    assert set(embeddings_by_id) == set(ids)
    assert [rid for rid, docs in labels_by_id.items() if len(docs) != 1] == []
    assert [rid for rid, docs in embeddings_by_id.items() if len(docs) != 1] == []
    assert all(r.key == json.loads(r.value)["id"].encode() for r in outputs)
    for rid in ids:
        assert_label_record(labels_by_id[rid][0], metadata[rid], sources[rid])
        assert_embedding_record(embeddings_by_id[rid][0])
    assert len({d[0]["taxonomy"]["version"] for d in labels_by_id.values()}) == 1
    assert len(first.events("labelled")) == REQUEST_COUNT
    assert not [e for e in first.events() if e.get("event") in REJECTION_EVENTS]

    before = count_records(broker.bootstrap, labels_topic, embeddings_topic, dlq_topic)
    assert before == {labels_topic: REQUEST_COUNT, embeddings_topic: REQUEST_COUNT}
    second = start_worker(env, tmp_path, "second")
    try:
        second.wait_for_event("partitions_assigned", timeout_s=60,
                              accept=lambda e: len(e.get("partitions", [])) == PARTITIONS)
        time.sleep(SECOND_RUN_S)
        assert second.proc.poll() is None, second.tail()
        assert_clean_stop(second)
    finally:
        second.kill()
    assert not second.events("labelled"), "the restarted worker reprocessed committed requests"
    assert count_records(broker.bootstrap, labels_topic, embeddings_topic, dlq_topic) == before
    assert committed_offsets(broker.bootstrap, group) == true_end_offsets(requests_topic, produced)


def write_worker_config(folder: Path, settings: dict[str, Any]) -> Path:
    path = folder / "worker.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def invalid_requests(bucket: str, key: str, uid: str) -> list[tuple[bytes | None, str]]:
    """(value, expected rejection code) for each kind of bad input."""
    image = {"s3": {"bucket": bucket, "key": key}}
    oversized = base64.b64encode(b"\xff" * 3000).decode("ascii")
    return [
        (b"{this is not json", "request.invalid_json"),
        (b"\xff\xfe\x80 not utf-8 \xc3\x28", "request.not_utf8"),
        (json.dumps({"image": image}).encode(), "request.invalid"),
        (json.dumps({"id": f"bad-two-{uid}", "image": {**image, "base64": tiny_jpeg_base64()}}).encode(),
         "request.invalid"),
        (json.dumps({"id": f"bad-big-{uid}", "image": {"base64": oversized}}).encode(), "request.invalid"),
        (s3_request(f"bad-tax-{uid}", bucket, key, taxonomy="no-such-taxonomy"), "taxonomy.unknown"),
        (s3_request(f"bad-key-{uid}", bucket, "photos/does-not-exist.jpg"), "s3.not_found"),
        (s3_request(f"bad-bucket-{uid}", f"ls-missing-{uid}", key), "s3.bucket_not_found"),
        (json.dumps({"id": f"bad-img-{uid}", "image": {"base64": base64.b64encode(b"plain text").decode()}}).encode(),
         "image.unsupported_format"),
        (None, "request.empty"),
    ]


def dead_letters_by_offset(bootstrap: str, topic: str) -> dict[int, tuple[DeadLetterHeaders, Any]]:
    records = read_all(bootstrap, topic)
    found = {}
    for record in records:
        headers = DeadLetterHeaders.from_kafka_headers(list(record.headers))
        found[headers.original_offset] = (headers, record)
    assert len(found) == len(records), "one input was dead-lettered more than once"
    return found


@pytest.mark.timeout(300)
def test_worker_rejects_bad_requests_keeps_labelling_and_takes_yaml_config_under_env(
    broker: Any,
    s3_client: Any,
    new_bucket: Callable[[], str],
    new_topic: Callable[..., str],
    unique_id: str,
    worker_env: Callable[..., dict[str, str]],
    sample_photos: list[Path],
    tmp_path: Path,
) -> None:
    requests_topic, yaml_labels_topic, env_labels_topic, embeddings_topic, dlq_topic, taxonomies_topic = (
        new_topic(1) for _ in range(6)
    )
    group = f"e2e-bad-{unique_id}"
    bucket = new_bucket()
    key = upload_photos(s3_client, bucket, sample_photos[:1])[0]
    # Settings come from the YAML file; the environment overrides only topics.labels.
    config = write_worker_config(tmp_path, {
        "topics": {"requests": requests_topic, "labels": yaml_labels_topic, "embeddings": embeddings_topic,
                   "dlq": dlq_topic, "taxonomies": taxonomies_topic},
        "kafka": {"group_id": group},
        "fetch": {"max_inline_bytes": 1000},
        "taxonomy": {"path": str(write_taxonomy(tmp_path))},
    })
    bad = invalid_requests(bucket, key, unique_id)
    good_ids = [f"good-{unique_id}-{i}" for i in range(len(bad) + 1)]
    good_values = [s3_request(rid, bucket, key) for rid in good_ids[:-1]]
    good_values.append(json.dumps({"id": good_ids[-1], "image": {"base64": tiny_jpeg_base64()}}).encode())
    # Good and bad alternate on one partition, a good one last, so a stall anywhere shows.
    interleaved = [value for pair in zip(good_values, [v for v, _ in bad], strict=False) for value in pair]
    interleaved.append(good_values[-1])
    # Keys too: kafka-python refuses a record with neither key nor value (the tombstone).
    keys = [f"r{i}".encode() for i in range(len(interleaved))]
    produced = produce(broker.bootstrap, requests_topic, ((0, k, v) for k, v in zip(keys, interleaved, strict=True)))
    bad_offsets = {produced[2 * i + 1].offset: code for i, (_, code) in enumerate(bad)}
    originals = {p.offset: (k, v) for p, k, v in zip(produced, keys, interleaved, strict=True)}

    env = worker_env(LABELSTREAM_TOPICS__LABELS=env_labels_topic)
    reader = assigned_reader(broker.bootstrap, env_labels_topic)
    worker = start_worker(env, tmp_path, "bad-requests", config=config)
    try:
        labels = read_until(reader, lambda got: len(got) >= len(good_ids), LABELS_TIMEOUT_S, worker)
        wait_for_commits(broker.bootstrap, group, true_end_offsets(requests_topic, produced), COMMIT_TIMEOUT_S, worker.assert_alive)
        assert worker.proc.poll() is None, f"worker died on bad input:\n{worker.tail()}"
        assert_clean_stop(worker)
    finally:
        worker.kill()
        reader.close()

    effective = worker.events("starting")[0]["settings"]
    assert effective["topics"]["labels"] == env_labels_topic
    assert (effective["topics"]["requests"], effective["fetch"]["max_inline_bytes"]) == (requests_topic, 1000)
    assert sorted(by_id(labels)) == sorted(good_ids)
    assert len(worker.events("labelled")) == len(good_ids)
    rejected = {e["offset"]: e for e in worker.events() if e.get("event") in REJECTION_EVENTS}
    assert {o: rejected.get(o, {}).get("code") for o in bad_offsets} == bad_offsets, worker.tail()
    assert all(e.get("error") and e.get("stage") for e in rejected.values())
    dead = dead_letters_by_offset(broker.bootstrap, dlq_topic)
    assert {o: h.error_code for o, (h, _) in dead.items()} == bad_offsets
    for offset, (headers, record) in dead.items():
        assert (headers.original_topic, headers.original_partition) == (requests_topic, 0)
        assert headers.consumer_group == group
        assert (record.key, record.value) == originals[offset], "dead letters keep the original bytes"
    counts = count_records(broker.bootstrap, yaml_labels_topic, env_labels_topic, embeddings_topic)
    assert counts == {env_labels_topic: len(good_ids), embeddings_topic: len(good_ids)}
