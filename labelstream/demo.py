"""`labelstream demo`: the real pipeline on an embedded broker and S3 server.

It starts Tansu (a Kafka-protocol broker) and moto's S3 server on loopback,
uploads sample photos, submits them, runs a worker until every one is
labelled, prints a table and shuts everything down.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

import torch
from kafka import KafkaConsumer

from consumers.kafka_clients import build_consumer, build_producer
from consumers.publisher import OutputPublisher
from consumers.worker import Worker
from labelstream.embedded import EmbeddedBroker, EmbeddedS3, create_topic
from labelstream.logs import configure_logging
from labelstream.sample_photos import write_sample_photos
from labelstream.submit import produce_requests, s3_client
from pipeline.config import LogSettings, ModelSettings, Settings
from pipeline.fetch import ImageFetcher
from pipeline.labeler import build_labeler
from pipeline.model import LoadedModel, load_model
from pipeline.taxonomy import everyday_taxonomy_path
from pipeline.weights import weights_availability

TINY_MODEL_CONFIG = Path(__file__).resolve().parent.parent / "pipeline" / "data" / "tiny-convnext-clip.json"
_BUCKET = "labelstream-demo"


def run_demo(image_count: int) -> int:
    configure_logging(LogSettings(level=os.environ.get("LABELSTREAM_DEMO_LOG_LEVEL", "WARNING"), format="console"))
    # The broker's readiness probe and open_clip's random-init notice are expected
    # here; the demo says what they mean in plain words instead.
    for name in ("kafka", "root"):
        logging.getLogger(name if name != "root" else None).setLevel(logging.ERROR)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "demo")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "demo")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    print("labelstream demo: starting an embedded Kafka-protocol broker (Tansu) and S3 server (moto)...")
    with EmbeddedBroker() as broker, EmbeddedS3() as s3, tempfile.TemporaryDirectory() as workdir:
        settings = _demo_settings(broker.bootstrap, s3.endpoint_url)
        model = _load_demo_model(settings.model, Path(workdir))
        settings = settings.model_copy(update={"model": model.source_settings})
        rows = _run_pipeline(settings, model.loaded, Path(workdir), image_count)
    _print_table(rows, model.meaningful)
    return 0


def _demo_settings(bootstrap: str, endpoint_url: str) -> Settings:
    return Settings.model_validate({
        "kafka": {"bootstrap_servers": bootstrap, "group_id": "labelstream-demo", "session_timeout_ms": 6000,
                  "heartbeat_interval_ms": 1000, "max_poll_interval_ms": 10000},
        "s3": {"endpoint_url": endpoint_url},
        "taxonomy": {"path": str(everyday_taxonomy_path())},
        "batch": {"max_size": 8, "max_wait_ms": 50},
        "model": {"device": "auto"},
        "log": {"level": "WARNING", "format": "console"},
    })


class _DemoModel:
    def __init__(self, loaded: LoadedModel, source_settings: ModelSettings, meaningful: bool) -> None:
        self.loaded, self.source_settings, self.meaningful = loaded, source_settings, meaningful


def _load_demo_model(settings: ModelSettings, workdir: Path) -> _DemoModel:
    available, reason = weights_availability(settings)
    if available:
        print(f"Loading {settings.name} ({settings.pretrained}): {reason}...")
        return _DemoModel(load_model(settings), settings, meaningful=True)
    print(f"\n*** The real weights for {settings.name} ({settings.pretrained}) are not available: {reason}.")
    print("*** Using a small randomly initialised test model instead: the pipeline is real, the labels are MEANINGLESS.\n")
    return _DemoModel(*_tiny_model(workdir), meaningful=False)


def _tiny_model(workdir: Path) -> tuple[LoadedModel, ModelSettings]:
    """The tiny test model, saved and loaded back through the local-checkpoint route."""
    import open_clip

    open_clip.add_model_config(TINY_MODEL_CONFIG)
    torch.manual_seed(0)
    checkpoint = workdir / "tiny-convnext-clip.pt"
    torch.save(open_clip.create_model(TINY_MODEL_CONFIG.stem, pretrained=None).state_dict(), checkpoint)
    settings = ModelSettings(name=str(TINY_MODEL_CONFIG), pretrained=str(checkpoint), device="cpu")
    return load_model(settings), settings


def _run_pipeline(settings: Settings, model: LoadedModel, workdir: Path, image_count: int) -> list[dict]:
    photos = write_sample_photos(workdir / "photos", image_count)
    client = s3_client(settings.s3)
    client.create_bucket(Bucket=_BUCKET)
    for topic in (settings.topics.requests, settings.topics.labels, settings.topics.embeddings, settings.topics.dlq):
        create_topic(settings.kafka.bootstrap_servers, topic, partitions=3)
    targets = []
    for photo in photos:
        client.upload_file(str(photo), _BUCKET, photo.name)
        targets.append((_BUCKET, photo.name))
    print(f"Uploaded {len(photos)} photos to s3://{_BUCKET}/ and submitting requests...")
    produce_requests(settings, targets, taxonomy=None)
    return _label_with_worker(settings, model, expected=len(targets))


def _label_with_worker(settings: Settings, model: LoadedModel, expected: int) -> list[dict]:
    labeler = build_labeler(settings, model=model)
    producer = build_producer(settings.kafka)
    publisher = OutputPublisher(
        producer, settings.topics, model.ref, settings.kafka.ack_wait_s(), settings.kafka.group_id
    )
    consumer = build_consumer(settings.kafka)
    worker = Worker(settings, labeler, ImageFetcher(settings.s3, settings.fetch), consumer, publisher)
    thread = threading.Thread(target=worker.run, name="worker", daemon=True)
    thread.start()
    print("Worker running; waiting for label records...")
    try:
        return _collect_labels(settings, expected, timeout_s=600)
    finally:
        worker.request_stop()
        thread.join(timeout=60)
        consumer.close(autocommit=False)
        producer.close()


def _collect_labels(settings: Settings, expected: int, timeout_s: float) -> list[dict]:
    reader = KafkaConsumer(settings.topics.labels, bootstrap_servers=settings.kafka.bootstrap_servers,
                           auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
    records: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < expected and time.monotonic() < deadline:
            for batch in reader.poll(timeout_ms=500).values():
                for message in batch:
                    record = json.loads(message.value)
                    records[record["id"]] = record
    finally:
        reader.close()
    if len(records) < expected:
        raise TimeoutError(f"only {len(records)} of {expected} images were labelled within {timeout_s:.0f}s")
    return sorted(records.values(), key=lambda r: r["id"])


def _print_table(rows: list[dict], meaningful: bool) -> None:
    width = max(len(_short(r["id"])) for r in rows)
    print(f"\n{'image'.ljust(width)}  top 3 labels")
    print(f"{'-' * width}  {'-' * 60}")
    for row in rows:
        labels = ", ".join(f"{x['label']} ({x['score']:.2f})" for x in row["labels"][:3])
        print(f"{_short(row['id']).ljust(width)}  {labels}")
    print(f"\n{len(rows)} images labelled, taxonomy {rows[0]['taxonomy']['name']} version {rows[0]['taxonomy']['version']}.")
    if not meaningful:
        print("Reminder: a random test model was used, so these labels are meaningless.")


def _short(record_id: str) -> str:
    return record_id.rsplit("/", 1)[-1]
