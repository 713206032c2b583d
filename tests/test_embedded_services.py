"""The embedded broker and S3 server behave like the real services the worker needs."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaTimeoutError

from labelstream.embedded import (
    EmbeddedBroker,
    EmbeddedS3,
    EmbeddedServiceError,
    ServiceProcess,
    create_topic,
    http_answers,
)

FAST_GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "max_poll_interval_ms": 10000}


def produce_one_per_batch(bootstrap: str, topic: str, count: int) -> None:
    # Waiting on every send keeps each record in its own batch: Tansu 0.6.0
    # reports end offsets as "last batch base + 1", which is only the true high
    # watermark when the last batch holds a single record.
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for i in range(count):
            producer.send(topic, key=f"k{i}".encode(), value=f"v{i}".encode()).get(timeout=10)
    finally:
        producer.close()


def consume_all(consumer: KafkaConsumer, expected: int, timeout_s: float = 30.0) -> list[bytes]:
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while len(values) < expected and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            values += [record.value for record in records]
    return values


def test_group_consumer_commits_up_to_the_end_offsets(
    broker: EmbeddedBroker, new_topic: Callable[..., str], unique_id: str
) -> None:
    topic = new_topic(partitions=3)
    produce_one_per_batch(broker.bootstrap, topic, count=12)
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=broker.bootstrap,
        group_id=f"group-{unique_id}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **FAST_GROUP,
    )
    try:
        values = consume_all(consumer, expected=12)
        consumer.commit()
        partitions = [TopicPartition(topic, p) for p in range(3)]
        committed = {tp: consumer.committed(tp) for tp in partitions}
        end_offsets = consumer.end_offsets(partitions)
    finally:
        consumer.close()
    assert sorted(values) == sorted(f"v{i}".encode() for i in range(12))
    assert committed == end_offsets
    assert sum(end_offsets.values()) == 12


def test_paused_broker_stalls_producers_until_resumed(broker: EmbeddedBroker, new_topic: Callable[..., str]) -> None:
    topic = new_topic(partitions=1)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", request_timeout_ms=2000)
    try:
        producer.send(topic, b"before").get(timeout=10)
        broker.pause()
        with pytest.raises(KafkaTimeoutError):
            producer.send(topic, b"during").get(timeout=2)
        broker.resume()
        assert producer.send(topic, b"after").get(timeout=20).topic == topic
    finally:
        broker.resume()
        producer.close(timeout=5)


def test_create_topic_tolerates_existing_topic_but_not_other_partition_count(
    broker: EmbeddedBroker, unique_id: str
) -> None:
    name = f"topic-{unique_id}"
    create_topic(broker.bootstrap, name, partitions=2)
    create_topic(broker.bootstrap, name, partitions=2)
    with pytest.raises(EmbeddedServiceError, match="2 partitions, not 4"):
        create_topic(broker.bootstrap, name, partitions=4)


def test_s3_put_then_get_returns_the_same_bytes(s3_client: Any, new_bucket: Callable[[], str]) -> None:
    bucket = new_bucket()
    s3_client.put_object(Bucket=bucket, Key="photos/a.jpg", Body=b"\xff\xd8jpeg bytes")
    body = s3_client.get_object(Bucket=bucket, Key="photos/a.jpg")["Body"].read()
    assert body == b"\xff\xd8jpeg bytes"


def test_s3_restart_serves_again_on_the_same_endpoint(
    s3_server: EmbeddedS3, s3_client: Any, new_bucket: Callable[[], str]
) -> None:
    endpoint = s3_server.endpoint_url
    s3_server.stop()
    assert not http_answers(endpoint)
    s3_server.start()
    assert s3_server.endpoint_url == endpoint
    # moto keeps buckets in memory, so the restart forgot them; a new one works.
    bucket = new_bucket()
    s3_client.put_object(Bucket=bucket, Key="k", Body=b"v")
    assert s3_client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"


def test_second_service_on_a_taken_port_is_refused(broker: EmbeddedBroker) -> None:
    with pytest.raises(EmbeddedServiceError, match="already in use"):
        EmbeddedBroker(port=broker.port).start()


def test_process_that_dies_at_start_up_reports_its_output(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('cannot bind: boom'); sys.exit(3)"]
    process = ServiceProcess("doomed server", argv, tmp_path / "doomed.log")
    process.start()
    with pytest.raises(EmbeddedServiceError, match=r"(?s)exit code 3.*cannot bind: boom"):
        process.wait_until_ready(lambda: False, timeout_s=10)
