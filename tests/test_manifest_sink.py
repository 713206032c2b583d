"""The Parquet manifest sink end to end: real `labelstream run` processes, the Tansu broker, moto S3.

What is proved: files appear only whole, read back with pyarrow to exactly the
label records on the labels topic (no row missing, none twice), land in the
partition of their taxonomy and their input record's date, honour a roll a
crashed predecessor pinned, and a SIGKILL in the middle of the rolls followed
by a restart still leaves every id in exactly one row.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import structlog
import yaml
from kafka import KafkaProducer, TopicPartition
from PIL import Image

from consumers.manifest_sink import ManifestSink
from consumers.offsets import Ticket
from consumers.records import Outcome, WorkItem
from pipeline.config import ManifestSinkSettings, RetrySettings, S3Settings
from pipeline.errors import FetchError, PublishError
from pipeline.fetch import build_s3_client
from pipeline.labeler import ImageLabels, PreparedImage
from schemas.labels import ModelRef, TaxonomyRef
from schemas.manifest import SCHEMA_VERSION, manifest_schema
from schemas.requests import Request
from tests.worker_process import (
    OutputCollector,
    WorkerProcess,
    committed_offsets,
    start_worker,
    wait_for_commits,
)

PARTITIONS = 2
EMBED_DIM = 64
TAXONOMIES = {"objects": ["dog", "cat", "flower", "textile", "city street"], "textures": ["smooth", "rough", "woven"]}
DAYS = [dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC), dt.datetime(2026, 3, 2, 12, tzinfo=dt.UTC)]
FILE_NAME = re.compile(r"^(?P<topic>.+)-(?P<partition>\d+)-(?P<first>\d{20})-(?P<last>\d{20})\.parquet$")
TIMEOUT_S = 120.0


# -- setup --------------------------------------------------------------------------------------


def write_taxonomies(folder: Path) -> list[str]:
    paths = []
    for name, classes in TAXONOMIES.items():
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "top_k": 3, "templates": ["a photo of a {}."], "classes": classes}))
        paths.append(str(path))
    return paths


def request(rid: str, index: int, bucket: str, keys: list[str]) -> bytes:
    """Alternating taxonomies; every fifth image inline (in the manifest too, with no image_uri)."""
    taxonomy = list(TAXONOMIES)[index % 2]
    image: dict[str, Any] = {"s3": {"bucket": bucket, "key": keys[index % len(keys)]}}
    if index % 5 == 4:
        image = {"base64": tiny_jpeg_base64(index)}
    return json.dumps({"id": rid, "image": image, "taxonomy": taxonomy, "metadata": {"n": index}}).encode()


def tiny_jpeg_base64(shade: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (shade % 256, 90, 160)).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def produce_dated(bootstrap: str, topic: str, values: list[bytes]) -> dict[TopicPartition, int]:
    """Round-robin over the partitions, alternating the record timestamps between two days."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        futures = [
            producer.send(topic, value=value, partition=i % PARTITIONS,
                          timestamp_ms=int(DAYS[(i // PARTITIONS) % 2].timestamp() * 1000))
            for i, value in enumerate(values)
        ]
        producer.flush(timeout=60)
        metadata = [f.get(timeout=60) for f in futures]
    finally:
        producer.close()
    ends: dict[TopicPartition, int] = {}
    for m in metadata:
        tp = TopicPartition(topic, m.partition)
        ends[tp] = max(ends.get(tp, 0), m.offset + 1)
    return ends


def upload_photos(s3_client: Any, bucket: str, photos: list[Path]) -> list[str]:
    keys = []
    for photo in photos[:8]:
        s3_client.upload_file(str(photo), bucket, f"photos/{photo.name}")
        keys.append(f"photos/{photo.name}")
    return keys


# -- reading the manifest back ---------------------------------------------------------------------


def list_keys(s3_client: Any, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [entry["Key"] for entry in page.get("Contents", [])]
    return keys


def read_files(s3_client: Any, bucket: str, prefix: str) -> dict[str, pa.Table]:
    """Every Parquet file under the prefix; each must be a complete, readable file."""
    tables = {}
    for key in list_keys(s3_client, bucket, prefix):
        if key.endswith(".parquet"):
            body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
            tables[key] = pq.read_table(io.BytesIO(body))
    return tables


def rows_by_id(tables: dict[str, pa.Table]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    rows: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for key, table in tables.items():
        for row in table.to_pylist():
            rows.setdefault(row["id"], []).append((key, row))
    return rows


def ranges_by_partition(tables: dict[str, pa.Table], topic: str) -> dict[int, set[tuple[int, int]]]:
    ranges: dict[int, set[tuple[int, int]]] = {}
    for key in tables:
        match = FILE_NAME.match(key.rsplit("/", 1)[1])
        assert match and match["topic"] == topic, key
        ranges.setdefault(int(match["partition"]), set()).add((int(match["first"]), int(match["last"])))
    return ranges


def assert_ranges_disjoint(ranges: dict[int, set[tuple[int, int]]]) -> None:
    for partition, spans in ranges.items():
        ordered = sorted(spans)
        for (_, last), (first, _) in zip(ordered, ordered[1:]):
            assert first > last, f"partition {partition}: overlapping rolls {ordered}"


def vector(document: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(document["vector"]), dtype="<f4")


def worker_settings(env_builder: Callable[..., dict[str, str]], topics: dict[str, str], group: str, uri: str,
                    taxonomy_files: list[str], **extra: str) -> dict[str, str]:
    return env_builder(
        LABELSTREAM_TOPICS__REQUESTS=topics["requests"],
        LABELSTREAM_TOPICS__LABELS=topics["labels"],
        LABELSTREAM_TOPICS__EMBEDDINGS=topics["embeddings"],
        LABELSTREAM_TOPICS__DLQ=topics["dlq"],
        LABELSTREAM_TOPICS__TAXONOMIES=topics["taxonomies"],
        LABELSTREAM_KAFKA__GROUP_ID=group,
        LABELSTREAM_TAXONOMY__FILES=json.dumps(taxonomy_files),
        LABELSTREAM_SINKS__MANIFEST__ENABLED="true",
        LABELSTREAM_SINKS__MANIFEST__URI=uri,
        **extra,
    )


def make_topics(new_topic: Callable[..., str]) -> dict[str, str]:
    return {"requests": new_topic(PARTITIONS), "labels": new_topic(PARTITIONS), "embeddings": new_topic(PARTITIONS),
            "dlq": new_topic(1), "taxonomies": new_topic(1)}


def wait_until_labelled(collector: OutputCollector, topic: str, ids: set[str], worker: WorkerProcess) -> None:
    done = collector.read_until(lambda got: {json.loads(r.value)["id"] for r in got if r.topic == topic} >= ids,
                                TIMEOUT_S, worker.assert_alive)
    assert done, f"not every request was labelled within {TIMEOUT_S:.0f}s:\n{worker.tail()}"


# -- the tests -------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
def test_manifest_files_hold_exactly_the_label_records_and_honour_a_pinned_roll(
    delivery: str, broker: Any, s3_client: Any, new_bucket: Callable[[], str], new_topic: Callable[..., str],
    unique_id: str, worker_env: Callable[..., dict[str, str]], sample_photos: list[Path], tmp_path: Path,
) -> None:
    count = 40
    topics, group, bucket, images = make_topics(new_topic), f"manifest-{unique_id}", new_bucket(), new_bucket()
    prefix = "datasets/run-1/"
    keys = upload_photos(s3_client, images, sample_photos)
    # A predecessor that crashed after starting roll [0, 4] of partition 0: the worker must finish it exactly.
    s3_client.put_object(Bucket=bucket, Key=f"{prefix}_rolls/{topics['requests']}/0/{0:020d}-{4:020d}", Body=b"")
    ids = [f"m-{unique_id}-{i:03d}" for i in range(count)]
    ends = produce_dated(broker.bootstrap, topics["requests"], [request(rid, i, images, keys) for i, rid in enumerate(ids)])
    env = worker_settings(worker_env, topics, group, f"s3://{bucket}/{prefix}", write_taxonomies(tmp_path),
                          LABELSTREAM_DELIVERY=delivery, LABELSTREAM_KAFKA__TRANSACTIONAL_ID=f"tx-{unique_id}",
                          LABELSTREAM_SINKS__MANIFEST__MAX_RECORDS="6",
                          LABELSTREAM_SINKS__MANIFEST__MAX_AGE_S="600",
                          LABELSTREAM_SINKS__MANIFEST__EMBEDDINGS="true")
    collector = OutputCollector(broker.bootstrap, topics["labels"], topics["embeddings"],
                                read_committed=delivery == "exactly_once")
    worker = start_worker(env, tmp_path, f"manifest-{delivery}")
    seen_whole: set[str] = set()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        # Until every label is out and the rolls due by count are written (the tail waits for the drain).
        while not seen_whole or not {json.loads(r.value)["id"] for r in collector.on(topics["labels"])} >= set(ids):
            assert time.monotonic() < deadline, worker.tail()
            worker.assert_alive()
            collector.poll()
            # Any file visible at any moment is a complete Parquet file.
            seen_whole |= set(read_files(s3_client, bucket, prefix))
        # The tail of each partition is below max_records and max_age: only the drain writes it.
        assert committed_offsets(broker.bootstrap, group) != ends
        assert worker.stop(60) == 0, worker.tail()
    finally:
        worker.kill()
    wait_for_commits(broker.bootstrap, group, ends, 30)
    collector.read_until_idle(idle_s=1.0)
    collector.close()

    tables = read_files(s3_client, bucket, prefix)
    assert seen_whole and seen_whole <= set(tables), "a file seen while running disappeared"
    rows = rows_by_id(tables)
    labels = {json.loads(r.value)["id"]: json.loads(r.value) for r in collector.on(topics["labels"])}
    embeddings = {json.loads(r.value)["id"]: json.loads(r.value) for r in collector.on(topics["embeddings"])}
    assert set(rows) == set(labels) == set(ids)
    assert [rid for rid, found in rows.items() if len(found) != 1] == []
    for rid, [(key, row)] in rows.items():
        label = labels[rid]
        day = DAYS[(label["source"]["offset"]) % 2].date().isoformat()
        assert f"{prefix}taxonomy={label['taxonomy']['name']}/date={day}/" in key
        assert row["taxonomy_version"] == label["taxonomy"]["version"]
        assert row["labels"] == label["labels"] and row["top_label"] == label["labels"][0]["label"]
        assert (row["source_partition"], row["source_offset"]) == (label["source"]["partition"], label["source"]["offset"])
        assert json.loads(row["metadata_json"]) == label["metadata"]
        inline = label["metadata"]["n"] % 5 == 4
        assert row["image_uri"] is None if inline else row["image_uri"].startswith(f"s3://{images}/photos/")
        np.testing.assert_array_equal(np.asarray(row["embedding"], dtype=np.float32), vector(embeddings[rid]))
    ranges = ranges_by_partition(tables, topics["requests"])
    assert (0, 4) in ranges[0], f"the pinned roll was not honoured: {sorted(ranges[0])}"
    assert_ranges_disjoint(ranges)
    any_table = next(iter(tables.values()))
    assert any_table.schema.metadata[b"labelstream.schema_version"] == SCHEMA_VERSION.encode()
    assert any_table.schema.field("embedding").type == pa.list_(pa.float32(), EMBED_DIM)
    assert any_table.schema.remove_metadata().equals(manifest_schema(EMBED_DIM).remove_metadata())


@pytest.mark.timeout(300)
def test_sigkill_in_the_middle_of_rolls_leaves_no_duplicate_and_no_missing_row(
    broker: Any, s3_client: Any, new_bucket: Callable[[], str], new_topic: Callable[..., str],
    unique_id: str, worker_env: Callable[..., dict[str, str]], sample_photos: list[Path], tmp_path: Path,
) -> None:
    count = 120
    topics, group, bucket, images = make_topics(new_topic), f"manifest-kill-{unique_id}", new_bucket(), new_bucket()
    prefix = "crash/"
    keys = upload_photos(s3_client, images, sample_photos)
    ids = [f"k-{unique_id}-{i:03d}" for i in range(count)]
    ends = produce_dated(broker.bootstrap, topics["requests"], [request(rid, i, images, keys) for i, rid in enumerate(ids)])
    settings = dict(LABELSTREAM_SINKS__MANIFEST__MAX_RECORDS="7", LABELSTREAM_BATCH__MAX_SIZE="4")
    env = worker_settings(worker_env, topics, group, f"s3://{bucket}/{prefix}", write_taxonomies(tmp_path),
                          LABELSTREAM_SINKS__MANIFEST__MAX_AGE_S="600", **settings)
    first = start_worker(env, tmp_path, "first")
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while len(markers := [k for k in list_keys(s3_client, bucket, f"{prefix}_rolls/")]) < 3:
            assert time.monotonic() < deadline, first.tail()
            first.assert_alive()
            time.sleep(0.02)
    finally:
        first.kill()
    committed_at_kill = committed_offsets(broker.bootstrap, group)
    assert committed_at_kill != ends, "the worker finished before it was killed: nothing was interrupted"
    markers = list_keys(s3_client, bucket, f"{prefix}_rolls/")
    pinned = [k for k in markers if int(k.rsplit("/", 1)[1][:20])
              >= committed_at_kill.get(TopicPartition(topics["requests"], int(k.split("/")[-2])), 0)]

    env = worker_settings(worker_env, topics, group, f"s3://{bucket}/{prefix}", write_taxonomies(tmp_path),
                          LABELSTREAM_SINKS__MANIFEST__MAX_AGE_S="1", **settings)
    collector = OutputCollector(broker.bootstrap, topics["labels"])
    second = start_worker(env, tmp_path, "second")
    try:
        wait_until_labelled(collector, topics["labels"], set(ids), second)
        wait_for_commits(broker.bootstrap, group, ends, TIMEOUT_S, second.assert_alive)
        assert second.stop(60) == 0, second.tail()
    finally:
        second.kill()
        collector.close()

    if pinned:
        logged = {name for e in second.events("manifest_rolls_pinned") for name in e["rolls"]}
        assert {k.rsplit("/", 1)[1] for k in pinned} <= logged, second.tail()
    tables = read_files(s3_client, bucket, prefix)
    rows = rows_by_id(tables)
    assert set(rows) == set(ids), f"missing: {sorted(set(ids) - set(rows))[:5]}"
    duplicated = {rid: [key for key, _ in found] for rid, found in rows.items() if len(found) != 1}
    assert duplicated == {}
    assert_ranges_disjoint(ranges_by_partition(tables, topics["requests"]))
    per_file = Counter(len(t) for t in tables.values())
    assert max(per_file) <= 7, per_file


# -- the roll bookkeeping on its own (real moto S3, no broker) -----------------------------------------


def staged_outcome(tp: TopicPartition, offset: int, labelled: bool = True) -> Outcome:
    request = Request.model_validate({"id": f"r-{tp.partition}-{offset}", "image": {"s3": {"bucket": "bkt", "key": "k"}}})
    item = WorkItem(ticket=Ticket(tp, offset, 1), topic=tp.topic, partition=tp.partition, offset=offset, key=None,
                    value=None, timestamp_ms=int(DAYS[0].timestamp() * 1000), headers=[], log=structlog.get_logger(),
                    request=request, prepared=PreparedImage(pixels=None, fetch_ms=1.0, decode_ms=1.0))
    if not labelled:
        return Outcome(item, error=FetchError("gone", code="s3.not_found"))
    labels = ImageLabels(embedding=np.ones(4, dtype=np.float32), labels=[("dog", 0.75)],
                         taxonomy=TaxonomyRef(name="objects", version="v1"), infer_ms=1.0)
    return Outcome(item, labels=labels)


def manifest_sink(endpoint: str, bucket: str) -> ManifestSink:
    settings = ManifestSinkSettings(enabled=True, uri=f"s3://{bucket}/m", max_records=3, max_age_s=600)
    return ManifestSink(settings, build_s3_client(S3Settings(endpoint_url=endpoint)), RetrySettings(), 5.0,
                        ModelRef(name="tiny", pretrained=None), max_held_offsets=1000)


def rolls_in(s3_client: Any, bucket: str, topic: str, partition: int) -> list[str]:
    return [key.rsplit("/", 1)[1] for key in list_keys(s3_client, bucket, f"m/_rolls/{topic}/{partition}/")]


def test_commits_stop_at_unwritten_rows_and_an_aborted_roll_is_rewritten_to_the_same_range(
    s3_server: Any, s3_client: Any, new_bucket: Callable[[], str],
) -> None:
    bucket, tp = new_bucket(), TopicPartition("req", 0)
    sink = manifest_sink(s3_server.endpoint_url, bucket)
    # Offset 2 was dead-lettered: no row, but inside the range.
    outcomes = [staged_outcome(tp, offset, labelled=offset != 2) for offset in range(5)]
    assert sink.stage(outcomes, {tp: 5}, (), committed=lambda _: None) == {tp: 4}
    assert rolls_in(s3_client, bucket, "req", 0) == [f"{0:020d}-{3:020d}"]
    assert sink.buffered_rows() == 1

    sink.rollback()  # the transaction that was to commit offset 4 aborted
    assert sink.buffered_rows() == 4
    assert sink.stage(outcomes, {tp: 5}, (), committed=lambda _: None) == {tp: 4}, "the retry re-rolls [0, 3]"
    sink.confirm()
    assert sink.stage([], {tp: 5}, (tp,), committed=lambda _: None) == {tp: 5}
    assert rolls_in(s3_client, bucket, "req", 0) == [f"{0:020d}-{3:020d}", f"{4:020d}-{4:020d}"]
    tables = read_files(s3_client, bucket, "m/")
    assert sorted(r["source_offset"] for t in tables.values() for r in t.to_pylist()) == [0, 1, 3, 4]


def test_a_restarted_partition_fills_the_gap_before_a_pinned_roll_then_honours_it(
    s3_server: Any, s3_client: Any, new_bucket: Callable[[], str],
) -> None:
    bucket, tp = new_bucket(), TopicPartition("req", 1)
    s3_client.put_object(Bucket=bucket, Key=f"m/_rolls/req/1/{5:020d}-{6:020d}", Body=b"")
    s3_client.put_object(Bucket=bucket, Key=f"m/_rolls/req/1/{0:020d}-{2:020d}", Body=b"")  # committed long ago
    sink = manifest_sink(s3_server.endpoint_url, bucket)
    outcomes = [staged_outcome(tp, offset) for offset in range(3, 8)]
    assert sink.stage(outcomes, {tp: 8}, (), committed=lambda _: 3) == {tp: 7}
    assert rolls_in(s3_client, bucket, "req", 1) == [f"{0:020d}-{2:020d}", f"{3:020d}-{4:020d}", f"{5:020d}-{6:020d}"]
    assert ranges_by_partition(read_files(s3_client, bucket, "m/"), "req") == {1: {(3, 4), (5, 6)}}
    # Inside a rebalance callback the committed offset cannot be read: an unknown partition is not committed.
    other = TopicPartition("req", 2)
    assert sink.stage([staged_outcome(other, 0)], {other: 1}, (other,), committed=None) == {}
    assert sink.buffered_rows() == 2
    sink.forget([other])
    assert sink.buffered_rows() == 1


def test_rows_holding_back_half_the_in_flight_limit_are_rolled_before_max_records(
    s3_server: Any, s3_client: Any, new_bucket: Callable[[], str],
) -> None:
    bucket, tp = new_bucket(), TopicPartition("req", 0)
    settings = ManifestSinkSettings(enabled=True, uri=f"s3://{bucket}/m", max_records=1000, max_age_s=600)
    sink = ManifestSink(settings, build_s3_client(S3Settings(endpoint_url=s3_server.endpoint_url)), RetrySettings(),
                        5.0, ModelRef(name="tiny", pretrained=None), max_held_offsets=4)
    assert sink.stage([staged_outcome(tp, o) for o in range(3)], {tp: 3}, (), committed=lambda _: 0) == {tp: 0}
    assert sink.stage([staged_outcome(tp, o) for o in range(3, 5)], {tp: 5}, (), committed=lambda _: 0) == {tp: 5}
    assert rolls_in(s3_client, bucket, "req", 0) == [f"{0:020d}-{4:020d}"]
    assert sink.buffered_rows() == 0


def test_a_missing_manifest_bucket_is_a_permanent_error_naming_it(s3_server: Any, unique_id: str) -> None:
    sink = manifest_sink(s3_server.endpoint_url, f"ls-missing-{unique_id}")
    tp = TopicPartition("req", 0)
    with pytest.raises(PublishError) as raised:
        sink.stage([staged_outcome(tp, 0)], {tp: 1}, (tp,), committed=lambda _: 0)
    assert raised.value.code == "s3.bucket_not_found" and not raised.value.retryable
    assert f"ls-missing-{unique_id}" in raised.value.message
    assert sink.buffered_rows() == 1, "the row stays buffered: nothing past it may be committed"


@pytest.mark.timeout(300)
def test_revoked_partitions_roll_their_rows_before_letting_go_and_the_new_owner_adds_no_duplicate(
    broker: Any, s3_client: Any, new_bucket: Callable[[], str], new_topic: Callable[..., str],
    unique_id: str, worker_env: Callable[..., dict[str, str]], sample_photos: list[Path], tmp_path: Path,
) -> None:
    count = 48
    topics, group, bucket, images = make_topics(new_topic), f"manifest-move-{unique_id}", new_bucket(), new_bucket()
    keys = upload_photos(s3_client, images, sample_photos)
    ids = [f"v-{unique_id}-{i:03d}" for i in range(count)]
    ends = produce_dated(broker.bootstrap, topics["requests"], [request(rid, i, images, keys) for i, rid in enumerate(ids)])
    # Neither the count nor the age rolls anything: only a revocation or a drain writes files.
    env = worker_settings(worker_env, topics, group, f"s3://{bucket}/move/", write_taxonomies(tmp_path),
                          LABELSTREAM_SINKS__MANIFEST__MAX_RECORDS="1000", LABELSTREAM_SINKS__MANIFEST__MAX_AGE_S="600")
    collector = OutputCollector(broker.bootstrap, topics["labels"])
    first = start_worker(env, tmp_path, "first")
    second = None
    try:
        wait_until_labelled(collector, topics["labels"], set(ids), first)
        assert not list_keys(s3_client, bucket, "move/"), "nothing was due yet"
        second = start_worker(env, tmp_path, "second")
        revoked = first.wait_for_event("partitions_revoked", TIMEOUT_S)
        assert revoked["abandoned"] == 0
        # Stopping a member in the middle of a rebalance can leave Tansu's group stuck: let it settle first.
        second.wait_for_event("partitions_assigned", TIMEOUT_S)
        assert first.stop(60) == 0, first.tail()
        wait_for_commits(broker.bootstrap, group, ends, TIMEOUT_S, second.assert_alive)
        assert second.stop(60) == 0, second.tail()
    finally:
        first.kill()
        if second is not None:
            second.kill()
        collector.close()

    # The revoked partitions' rows were written inside the revoke callback, before the partitions moved.
    revoked_names = set(revoked["partitions"])
    rolled_at_revoke = {f"{e['partition']}" for e in first.events("manifest_rolled") if e["timestamp"] <= revoked["timestamp"]}
    assert revoked_names and revoked_names <= rolled_at_revoke, first.tail()
    rows = rows_by_id(read_files(s3_client, bucket, "move/"))
    assert set(rows) == set(ids)
    assert {rid: len(found) for rid, found in rows.items() if len(found) != 1} == {}
