"""THE NAIVE BASELINE: the consume loop people write by hand. Benchmark code only.

For each message, in order, on one thread: poll it, fetch the image from S3,
decode and preprocess it, run the model on a batch of 1, produce the label and
embedding records and wait for the broker's acknowledgement, then commit the
offset synchronously. It uses labelstream's own fetcher, preprocessing and
model, so the comparison with the worker measures the pipelining alone.
"""

from __future__ import annotations

import json
import time
import uuid

from kafka import KafkaConsumer, KafkaProducer

from bench.stream import Services, Topics
from pipeline.config import FetchSettings, S3Settings
from pipeline.fetch import ImageFetcher
from pipeline.labeler import Labeler
from schemas.requests import Request


def naive_rate(services: Services, topics: Topics, labeler: Labeler, expected: int, timeout_s: float) -> float:
    """Images/s of the naive loop over `expected` requests already on `topics.requests`."""
    consumer = KafkaConsumer(
        topics.requests, bootstrap_servers=services.bootstrap, group_id=f"naive-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=1,
        session_timeout_ms=6000, heartbeat_interval_ms=1000,
    )  # fmt: skip
    producer = KafkaProducer(bootstrap_servers=services.bootstrap, acks="all")
    fetcher = ImageFetcher(S3Settings(endpoint_url=services.endpoint_url), FetchSettings())
    try:
        return _consume(consumer, producer, fetcher, labeler, topics, expected, timeout_s)
    finally:
        consumer.close(autocommit=False)
        producer.close()


def _consume(
    consumer: KafkaConsumer, producer: KafkaProducer, fetcher: ImageFetcher, labeler: Labeler,
    topics: Topics, expected: int, timeout_s: float,
) -> float:  # fmt: skip
    done, first_done_at = 0, 0.0
    deadline = time.monotonic() + timeout_s
    while done < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"naive loop: {done} of {expected} in {timeout_s:.0f}s")
        for records in consumer.poll(timeout_ms=100, max_records=1).values():
            for record in records:
                _handle(record.value, producer, fetcher, labeler, topics)
                consumer.commit()
                done += 1
                first_done_at = first_done_at or time.perf_counter()
    # The clock starts at the first finished message, so the group join is not counted.
    return (done - 1) / max(time.perf_counter() - first_done_at, 1e-9)


def _handle(value: bytes, producer: KafkaProducer, fetcher: ImageFetcher, labeler: Labeler, topics: Topics) -> None:
    request = Request.model_validate_json(value)
    prepared = labeler.prepare_bytes(fetcher.fetch(request.image))
    (labels,) = labeler.label([prepared.pixels], [labeler.classifier_for(request.taxonomy)])
    key = request.id.encode()
    label = {"id": request.id, "labels": [{"label": n, "score": s} for n, s in labels.labels]}
    producer.send(topics.labels, key=key, value=json.dumps(label).encode()).get(timeout=30)
    embedding = {"id": request.id, "embedding": labels.embedding.tolist()}
    producer.send(topics.embeddings, key=key, value=json.dumps(embedding).encode()).get(timeout=30)
