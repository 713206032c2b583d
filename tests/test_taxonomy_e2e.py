"""Taxonomies end to end: a real `labelstream run`, the Tansu broker, moto S3 and the tiny model.

Several taxonomies in one worker, multi-label thresholds checked against scores
this test computes itself, hot reload from files and from the taxonomies topic
while requests keep flowing, and the on-disk classifier cache across restarts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from pipeline.classifier import build_classifier
from pipeline.config import ImageSettings, ModelSettings
from pipeline.labeler import Labeler
from pipeline.model import LoadedModel, load_model
from pipeline.registry import ClassifierRegistry
from pipeline.taxonomy import parse_taxonomy
from schemas.labels import LabelRecord
from tests.worker_process import WorkerProcess
from tests.worker_process import start_worker as launch_worker

REPO_ROOT = Path(__file__).resolve().parent.parent
PHOTOS = 6
START_TIMEOUT_S = 60.0
EVENT_TIMEOUT_S = 30.0
LABELS_TIMEOUT_S = 60.0
STREAM_INTERVAL_S = 0.05
SCORE_TOLERANCE = 1e-4

SCENES = {
    "name": "scenes",
    "top_k": 2,
    "templates": ["a photo of a {}.", "a photo of the {}, outdoors."],
    "classes": ["beach", "city street", "mountain", "forest"],
}
ANIMALS = {
    "name": "animals",
    "mode": "multi_label",
    "top_k": 3,
    "templates": ["a photo of a {}.", "a close-up photo of a {}."],
    "classes": [
        {"name": "dog", "prompts": ["dog", "puppy"], "negative_prompts": ["wolf", "fox"]},
        {"name": "cat", "negative_prompts": ["lion"]},
        {"name": "flower"},
        {"name": "textile", "prompts": ["textile", "fabric"]},
    ],
}


# -- the worker subprocess and its JSON log -------------------------------------------------


def stop_cleanly(worker: WorkerProcess) -> None:
    """SIGTERM; the worker must exit 0 (the fixture kills it if it hangs)."""
    code = worker.stop()
    assert code == 0, worker.tail()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(env: dict[str, str]) -> WorkerProcess:
        started.append(launch_worker(env, tmp_path, f"worker-{len(started)}"))
        return started[-1]

    yield start
    for worker in started:
        worker.kill()


# -- one isolated setup per test: topics, bucket, photos, taxonomy folder ----------------------


@dataclass
class Stage:
    bootstrap: str
    bucket: str
    keys: list[str]
    requests: str
    labels: str
    taxonomies: str
    directory: Path
    env: dict[str, str]
    produced: list[str] = field(default_factory=list)

    def send(self, producer: KafkaProducer, request_id: str, key: str, taxonomy: str | None) -> None:
        request: dict[str, Any] = {"id": request_id, "image": {"s3": {"bucket": self.bucket, "key": key}}}
        if taxonomy is not None:
            request["taxonomy"] = taxonomy
        producer.send(self.requests, key=request_id.encode(), value=json.dumps(request).encode()).get(timeout=30)
        self.produced.append(request_id)


@pytest.fixture
def stage(tmp_path: Path, broker: Any, new_topic: Callable[..., str], new_bucket: Callable[[], str], s3_client: Any,
          sample_photos: list[Path], worker_env: Callable[..., dict[str, str]], unique_id: str) -> Stage:
    bucket = new_bucket()
    keys = []
    for photo in sample_photos[:PHOTOS]:
        s3_client.upload_file(str(photo), bucket, photo.name)
        keys.append(photo.name)
    requests, labels, embeddings, dlq = new_topic(3), new_topic(3), new_topic(3), new_topic(1)
    taxonomies = new_topic(1)
    directory = tmp_path / "taxonomies"
    directory.mkdir()
    env = worker_env(
        LABELSTREAM_TOPICS__REQUESTS=requests, LABELSTREAM_TOPICS__LABELS=labels,
        LABELSTREAM_TOPICS__EMBEDDINGS=embeddings, LABELSTREAM_TOPICS__DLQ=dlq,
        LABELSTREAM_TOPICS__TAXONOMIES=taxonomies, LABELSTREAM_KAFKA__GROUP_ID=f"taxonomy-e2e-{unique_id}",
        LABELSTREAM_TAXONOMY__DIR=str(directory), LABELSTREAM_TAXONOMY__WATCH_INTERVAL_S="0.2",
        LABELSTREAM_TAXONOMY__CACHE_DIR=str(tmp_path / "classifier-cache"),
    )
    return Stage(broker.bootstrap, bucket, keys, requests, labels, taxonomies, directory, env)


def write(path: Path, document: dict[str, Any]) -> Path:
    # Write-then-rename, as deploy tooling should: the watcher never sees half a file.
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(yaml.safe_dump(document, sort_keys=False))
    scratch.replace(path)
    return path


def producer_for(stage: Stage) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=stage.bootstrap, acks="all", linger_ms=0)


class LabelReader:
    """Reads the labels topic from the beginning in the background (read_committed, no group)."""

    def __init__(self, stage: Stage) -> None:
        self.consumer = KafkaConsumer(bootstrap_servers=stage.bootstrap, group_id=None, enable_auto_commit=False,
                                      auto_offset_reset="earliest", isolation_level="read_committed")
        partitions = [TopicPartition(stage.labels, p) for p in range(3)]
        self.consumer.assign(partitions)
        self.consumer.seek_to_beginning(*partitions)
        self.records: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            for batch in self.consumer.poll(timeout_ms=200).values():
                self.records += [json.loads(r.value) for r in batch]

    def wait_for_ids(self, ids: list[str], timeout_s: float = LABELS_TIMEOUT_S) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not set(ids) <= {r["id"] for r in self.records}:
            time.sleep(0.1)
        missing = set(ids) - {r["id"] for r in self.records}
        assert not missing, f"{len(missing)} requests never labelled, e.g. {sorted(missing)[:5]}"
        return {r["id"]: r for r in self.records}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.consumer.close()


# -- the test's own scores ---------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_model: Any) -> LoadedModel:
    settings = ModelSettings(name=str(tiny_model.config_path), pretrained=str(tiny_model.checkpoint_path), device="cpu")
    return load_model(settings)


def scores_by_key(model: LoadedModel, document: dict[str, Any], photos: list[Path]) -> dict[str, dict[str, float]]:
    """Per photo, every class's score: the worker's preprocessing and scoring, run here."""
    classifier = build_classifier(model, parse_taxonomy(yaml.safe_dump(document)))
    labeler = Labeler(model, ClassifierRegistry([classifier]), ImageSettings())
    pixels = torch.stack([labeler.prepare_bytes(p.read_bytes()).pixels for p in photos])
    table = classifier.probabilities(model.encode_images(pixels)).tolist()
    return {p.name: dict(zip(classifier.taxonomy.class_names, row, strict=True)) for p, row in zip(photos, table, strict=True)}


def thresholds_between(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per class, a threshold in the widest gap between two photos' scores, so some pass and some don't."""
    thresholds = {}
    for name in next(iter(scores.values())):
        ordered = sorted(row[name] for row in scores.values())
        gap, low = max((ordered[i + 1] - ordered[i], ordered[i]) for i in range(len(ordered) - 1))
        assert gap > 20 * SCORE_TOLERANCE, f"class {name}: scores too close to split safely: {ordered}"
        thresholds[name] = low + gap / 2
    return thresholds


# -- tests ---------------------------------------------------------------------------------


def test_requests_pick_their_taxonomy_and_multi_label_records_hold_exactly_the_classes_over_threshold(
    stage: Stage, model: LoadedModel, sample_photos: list[Path], start_worker: Callable[[dict[str, str]], WorkerProcess]
) -> None:
    photos = sample_photos[:PHOTOS]
    animal_scores = scores_by_key(model, ANIMALS, photos)
    thresholds = thresholds_between(animal_scores)
    animals = {**ANIMALS, "classes": [{**c, "threshold": thresholds[c["name"]]} for c in ANIMALS["classes"]]}
    write(stage.directory / "animals.yaml", animals)
    write(stage.directory / "scenes.yml", SCENES)
    versions = {d["name"]: parse_taxonomy(yaml.safe_dump(d)).version(model.identity) for d in (animals, SCENES)}
    scene_scores = scores_by_key(model, SCENES, photos)

    worker = start_worker({**stage.env, "LABELSTREAM_TAXONOMY__DEFAULT": "scenes"})
    worker.wait_for_event("worker_started", START_TIMEOUT_S)
    reader = LabelReader(stage)
    producer = producer_for(stage)
    for key in stage.keys:
        stage.send(producer, f"animals-{key}", key, "animals")
        stage.send(producer, f"scenes-{key}", key, "scenes")
        stage.send(producer, f"default-{key}", key, None)
    stage.send(producer, "unknown-taxonomy", stage.keys[0], "birds")
    producer.close()
    expected_ids = [i for i in stage.produced if i != "unknown-taxonomy"]
    records = reader.wait_for_ids(expected_ids)
    reader.close()
    stop_cleanly(worker)

    for key in stage.keys:
        record = LabelRecord.model_validate(records[f"animals-{key}"])
        assert (record.taxonomy.name, record.taxonomy.version, record.mode) == ("animals", versions["animals"], "multi_label")
        wanted = sorted((n for n, s in animal_scores[key].items() if s >= thresholds[n]), key=lambda n: -animal_scores[key][n])
        assert record.selected is not None and [s.label for s in record.selected] == wanted
        for entry in record.selected + record.labels:
            assert entry.score == pytest.approx(animal_scores[key][entry.label], abs=SCORE_TOLERANCE)
        assert [s.label for s in record.labels] == sorted(animal_scores[key], key=lambda n: -animal_scores[key][n])[:3]
        for prefix in ("scenes", "default"):
            record = LabelRecord.model_validate(records[f"{prefix}-{key}"])
            assert (record.taxonomy.name, record.taxonomy.version, record.mode) == ("scenes", versions["scenes"], "single_label")
            assert record.selected is None
            assert [s.label for s in record.labels] == sorted(scene_scores[key], key=lambda n: -scene_scores[key][n])[:2]
    assert "unknown-taxonomy" not in records
    assert "taxonomy.unknown" in worker.log_text()
    assert {e["taxonomy"] for e in worker.events("classifier_built")} == {"animals", "scenes"}


def test_a_second_start_with_the_same_taxonomies_loads_the_classifiers_from_the_cache(
    stage: Stage, start_worker: Callable[[dict[str, str]], WorkerProcess]
) -> None:
    write(stage.directory / "animals.yaml", ANIMALS)
    write(stage.directory / "scenes.yaml", SCENES)
    env = {**stage.env, "LABELSTREAM_TAXONOMY__FEED_ENABLED": "false"}
    first = start_worker(env)
    first.wait_for_event("worker_started", START_TIMEOUT_S)
    stop_cleanly(first)
    assert {e["taxonomy"] for e in first.events("classifier_built")} == {"animals", "scenes"}
    assert not first.events("classifier_cache_hit")

    second = start_worker(env)
    second.wait_for_event("worker_started", START_TIMEOUT_S)
    stop_cleanly(second)
    assert {e["taxonomy"] for e in second.events("classifier_cache_hit")} == {"animals", "scenes"}
    assert not second.events("classifier_built")


def test_hot_reload_from_file_and_topic_while_consuming_loses_and_duplicates_nothing(
    stage: Stage, model: LoadedModel, start_worker: Callable[[dict[str, str]], WorkerProcess], tmp_path: Path
) -> None:
    path = write(stage.directory / "scenes.yaml", SCENES)
    second = {**SCENES, "classes": [*SCENES["classes"], "desert"]}
    third = {**SCENES, "classes": [*SCENES["classes"], "glacier"]}
    v1, v2, v3 = (parse_taxonomy(yaml.safe_dump(d)).version(model.identity) for d in (SCENES, second, third))
    worker = start_worker(stage.env)
    worker.wait_for_event("worker_started", START_TIMEOUT_S)
    reader = LabelReader(stage)
    stream = RequestStream(stage)
    stream.start()
    try:
        first = stream.wait_until_sent(5)
        assert {r["taxonomy"]["version"] for r in reader.wait_for_ids(first).values()} == {v1}
        write(path, second)
        worker.wait_for_event("taxonomy_loaded", EVENT_TIMEOUT_S, lambda e: e["version"] == v2)
        after_file_edit = stream.mark()

        path.write_text(yaml.safe_dump(second).replace("top_k: 2", "top_k: zero"))
        rejected = worker.wait_for_event("taxonomy_rejected", EVENT_TIMEOUT_S)
        after_invalid_edit = stream.mark()

        published = write(tmp_path / "scenes-v3.yaml", third)
        publish = subprocess.run([sys.executable, "-m", "labelstream.cli", "taxonomy", "publish", str(published)],
                                 cwd=REPO_ROOT, env=stage.env, capture_output=True, text=True, timeout=60)
        assert publish.returncode == 0, publish.stderr
        assert f"published scenes version {v3}" in publish.stdout
        worker.wait_for_event("taxonomy_loaded", EVENT_TIMEOUT_S, lambda e: e["version"] == v3)
        after_publish = stream.mark()
        time.sleep(1.0)
    finally:
        stream.stop()
    records = reader.wait_for_ids(stream.sent_after(0))
    counts = Counter(r["id"] for r in reader.records)
    reader.close()
    stop_cleanly(worker)

    assert set(counts) == set(stream.sent_after(0)) and max(counts.values()) == 1, "every id exactly once"
    version_of = {request_id: records[request_id]["taxonomy"]["version"] for request_id in counts}
    assert version_of[stream.sent_after(0)[0]] == v1
    assert {version_of[i] for i in stream.sent_after(after_file_edit)} <= {v2, v3}
    assert {version_of[i] for i in stream.sent_between(after_invalid_edit, after_publish)} <= {v2, v3}
    assert {version_of[i] for i in stream.sent_after(after_publish)} == {v3}
    assert stream.sent_between(after_file_edit, after_invalid_edit), "the stream kept flowing across the switch"
    assert rejected["file"] == str(path) and "field 'top_k' (line" in rejected["error"]
    assert_versions_only_move_forward(reader.records, [v1, v2, v3])


class RequestStream:
    """A steady trickle of requests from a background thread; `mark()` notes how many were sent."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        producer = producer_for(self.stage)
        try:
            while not self._stop.is_set():
                key = self.stage.keys[len(self.stage.produced) % len(self.stage.keys)]
                self.stage.send(producer, f"stream-{len(self.stage.produced):05d}", key, "scenes")
                time.sleep(STREAM_INTERVAL_S)
        finally:
            producer.close()

    def wait_until_sent(self, count: int) -> list[str]:
        while len(self.stage.produced) < count:
            assert self._thread.is_alive(), "the request stream stopped"
            time.sleep(STREAM_INTERVAL_S)
        return self.stage.produced[:count]

    def mark(self) -> int:
        return len(self.stage.produced)

    def sent_after(self, mark: int) -> list[str]:
        return self.stage.produced[mark:]

    def sent_between(self, start: int, end: int) -> list[str]:
        return self.stage.produced[start:end]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def assert_versions_only_move_forward(records: list[dict[str, Any]], order: list[str]) -> None:
    """Within a partition, requests are admitted in offset order, so versions never go back."""
    by_partition: dict[int, list[tuple[int, int]]] = {}
    for record in records:
        source = record["source"]
        by_partition.setdefault(source["partition"], []).append((source["offset"], order.index(record["taxonomy"]["version"])))
    for partition, seen in by_partition.items():
        ranks = [rank for _, rank in sorted(seen)]
        assert ranks == sorted(ranks), f"partition {partition} went back to an older taxonomy version"
