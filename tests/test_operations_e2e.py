"""Operating labelstream end to end: metrics, probes, S3 event notifications and `top` against a real worker.

Nothing is mocked: a real `labelstream run` subprocess with the tiny model
consumes from the session's Tansu broker and reads from moto S3; the tests
scrape its ops port over HTTP and read its outputs back over Kafka. The one
injected failure is a test-only model config whose image tower cannot take
its own input size, so every image forward raises inside open_clip/torch.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest
import yaml
from kafka.consumer.fetcher import ConsumerRecord
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from schemas.deadletter import DeadLetterHeaders
from schemas.labels import LabelRecord
from tests.worker_process import (
    OutputCollector,
    WorkerProcess,
    produce,
    start_worker,
    true_end_offsets,
    wait_for_commits,
)
from tests.terminal_screen import TmuxRunner, private_tmux, wait_for_pane

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG_PATH = REPO_ROOT / "pipeline" / "data" / "tiny-convnext-clip.json"
TAXONOMY = {"name": "ops-e2e", "templates": ["a photo of a {}."], "classes": ["dog", "cat", "flower", "textile"]}
GOOD_COUNT = 30
PARTITIONS = 3
STAGES = ("fetch", "decode", "infer", "publish", "end_to_end")
OUTPUT_TIMEOUT_S = 90.0
COMMIT_TIMEOUT_S = 30.0
PORT_TIMEOUT_S = 60.0
# Bad inputs of test 1 that need no bucket, by the dead-letter code each must end with;
# MISSING_KEYS requests naming absent S3 keys (s3.not_found) join them.
BAD_INPUTS = {
    "request.invalid_json": [b"{not json", b"[1, 2"],
    "request.invalid": [json.dumps({"id": "no-image"}).encode()],
}
MISSING_KEYS = 2
BAD_COUNT = sum(len(values) for values in BAD_INPUTS.values()) + MISSING_KEYS


# -- HTTP against the ops port ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """(status, body); 4xx/5xx are answers, not exceptions."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as answer:
        return answer.code, answer.read()


def probe(base: str, path: str) -> tuple[int, dict[str, Any]]:
    status, body = http_get(f"{base}{path}")
    return status, json.loads(body)


def wait_for_port(base: str, worker: WorkerProcess, timeout_s: float = PORT_TIMEOUT_S) -> tuple[int, dict[str, Any]]:
    """Poll /readyz as fast as is reasonable; the first answer the server gives."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        worker.assert_alive()
        try:
            return probe(base, "/readyz")
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.01)
    raise AssertionError(f"ops port never answered:\n{worker.tail()}")


def wait_for_probe(base: str, path: str, status: int, worker: WorkerProcess, timeout_s: float = 60.0,
                   accept: Callable[[dict[str, Any]], bool] = lambda _d: True) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last: tuple[int, dict[str, Any]] | None = None
    while time.monotonic() < deadline:
        worker.assert_alive()
        last = probe(base, path)
        if last[0] == status and accept(last[1]):
            return last[1]
        time.sleep(0.1)
    raise AssertionError(f"{path} never answered {status}; last {last}:\n{worker.tail()}")


@dataclass(frozen=True)
class Scrape:
    samples: list[tuple[str, dict[str, str], float]]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels`."""
        return sum(v for n, ls, v in self.samples if n == name and labels.items() <= ls.items())

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(ls, v) for n, ls, v in self.samples if n == name]

    def by_label(self, name: str, label: str) -> dict[str, float]:
        grouped: Counter[str] = Counter()
        for ls, v in self.series(name):
            grouped[ls.get(label, "")] += v
        return {key: value for key, value in grouped.items() if value}


def scrape(base: str) -> Scrape:
    status, body = http_get(f"{base}/metrics")
    assert status == 200, body[:500]
    samples = [(s.name, dict(s.labels), float(s.value))
               for family in text_string_to_metric_families(body.decode("utf-8")) for s in family.samples]
    return Scrape(samples)


# -- the system under test --------------------------------------------------------------------


@dataclass
class System:
    bootstrap: str
    requests: str
    labels: str
    embeddings: str
    dlq: str
    group: str
    port: int
    env: dict[str, str]
    log_dir: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def outputs(self) -> OutputCollector:
        return OutputCollector(self.bootstrap, self.labels, self.dlq)


@pytest.fixture
def system(
    broker: Any, new_topic: Callable[..., str], unique_id: str, worker_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> Callable[..., System]:
    taxonomy = tmp_path / "taxonomy.yaml"
    taxonomy.write_text(yaml.safe_dump(TAXONOMY))

    def build(partitions: int = PARTITIONS, **overrides: str) -> System:
        requests, labels, embeddings, dlq = new_topic(partitions), new_topic(1), new_topic(1), new_topic(1)
        group, port = f"ops-{unique_id}", free_port()
        env = worker_env(
            LABELSTREAM_TOPICS__REQUESTS=requests,
            LABELSTREAM_TOPICS__LABELS=labels,
            LABELSTREAM_TOPICS__EMBEDDINGS=embeddings,
            LABELSTREAM_TOPICS__DLQ=dlq,
            LABELSTREAM_KAFKA__GROUP_ID=group,
            LABELSTREAM_TAXONOMY__PATH=str(taxonomy),
            LABELSTREAM_TAXONOMY__FEED_ENABLED="false",
            LABELSTREAM_TAXONOMY__WATCH_INTERVAL_S="0",
            LABELSTREAM_WORKER__COMMIT_INTERVAL_MS="50",
            # Dead letters are not held back for the breaker's 10 s default.
            LABELSTREAM_DEAD_LETTER__HOLD_TIMEOUT_S="0.2",
            LABELSTREAM_METRICS__HOST="127.0.0.1",
            LABELSTREAM_METRICS__PORT=str(port),
            **overrides,
        )
        return System(broker.bootstrap, requests, labels, embeddings, dlq, group, port, env, tmp_path)

    return build


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Every worker a test appends here is killed afterwards, whatever happened."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.kill()


def jpeg_bytes(photo: Path, variant: int, side: int = 96) -> bytes:
    """A small JPEG; `variant` marks one pixel so that every upload has distinct content (no dedupe hits)."""
    with Image.open(photo) as image:
        image = image.convert("RGB")
        image.thumbnail((side, side))
        image.putpixel((0, 0), (variant % 256, (variant * 7) % 256, (variant * 13) % 256))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def s3_request(request_id: str, bucket: str, key: str) -> bytes:
    return json.dumps({"id": request_id, "image": {"s3": {"bucket": bucket, "key": key}}}).encode()


def labels_by_id(records: list[ConsumerRecord]) -> dict[str, LabelRecord]:
    parsed = [LabelRecord.model_validate_json(r.value) for r in records]
    return {label.id: label for label in parsed}


def dead_letter_codes(records: list[ConsumerRecord]) -> Counter[str]:
    return Counter(DeadLetterHeaders.from_kafka_headers(list(r.headers)).error_code for r in records)


# -- 1 and 4: metrics match the stream; `labelstream top` shows them ----------------------------


def test_metrics_count_exactly_what_the_stream_held_and_top_renders_them(
    system: Callable[..., System], workers: list[WorkerProcess], s3_client: Any,
    new_bucket: Callable[[], str], sample_photos: list[Path], tmux: Callable[..., str],
) -> None:
    sys_ = system()
    bucket = new_bucket()
    messages: list[tuple[int, bytes | None, bytes | None]] = []
    for i in range(GOOD_COUNT):
        key = f"good/{i:03d}.jpg"
        s3_client.put_object(Bucket=bucket, Key=key, Body=jpeg_bytes(sample_photos[i % len(sample_photos)], i))
        messages.append((i % PARTITIONS, f"good-{i}".encode(), s3_request(f"good-{i}", bucket, key)))
    bad = {code: list(values) for code, values in BAD_INPUTS.items()}
    bad["s3.not_found"] = [s3_request(f"missing-{i}", bucket, f"missing/{i}.jpg") for i in range(MISSING_KEYS)]
    for n, value in enumerate(v for values in bad.values() for v in values):
        messages.append((n % PARTITIONS, f"bad-{n}".encode(), value))
    expected_dead = {code: len(values) for code, values in bad.items()}
    total = len(messages)

    worker = start_worker(sys_.env, sys_.log_dir, "metrics")
    workers.append(worker)
    wait_for_port(sys_.base, worker)
    wait_for_probe(sys_.base, "/readyz", 200, worker)
    produced = produce(sys_.bootstrap, sys_.requests, messages)

    # Scrape while the worker runs: the counters only ever climb towards the stream's totals.
    outputs = sys_.outputs()
    try:
        during: list[Scrape] = []

        def finished(records: list[ConsumerRecord]) -> bool:
            during.append(scrape(sys_.base))
            return len(records) >= total

        assert outputs.read_until(finished, OUTPUT_TIMEOUT_S, worker.assert_alive), worker.tail()
        wait_for_commits(sys_.bootstrap, sys_.group, true_end_offsets(sys_.requests, produced), COMMIT_TIMEOUT_S,
                         worker.assert_alive)
        outputs.read_until_idle(idle_s=1.0)
        label_records, dlq_records = outputs.on(sys_.labels), outputs.on(sys_.dlq)
    finally:
        outputs.close()
    consumed_during = [s.value("labelstream_requests_consumed_total") for s in during]
    assert consumed_during == sorted(consumed_during) and max(consumed_during) <= total

    labelled_seen = Counter(LabelRecord.model_validate_json(r.value).taxonomy.name for r in label_records)
    assert labelled_seen == {TAXONOMY["name"]: GOOD_COUNT}
    assert dead_letter_codes(dlq_records) == expected_dead

    # Lag is refreshed once a second by the poll loop; wait for the settled value.
    deadline = time.monotonic() + 10
    final = scrape(sys_.base)
    while sum(v for _l, v in final.series("labelstream_consumer_lag")) and time.monotonic() < deadline:
        time.sleep(0.3)
        final = scrape(sys_.base)

    assert final.value("labelstream_requests_consumed_total") == total
    assert final.by_label("labelstream_requests_labelled_total", "taxonomy") == dict(labelled_seen)
    assert final.by_label("labelstream_dead_letters_total", "code") == expected_dead
    assert final.by_label("labelstream_requests_failed_total", "code") == expected_dead
    assert final.value("labelstream_batch_size_count") > 0
    assert final.value("labelstream_batch_size_sum") == GOOD_COUNT
    stage_counts = final.by_label("labelstream_stage_seconds_count", "stage")
    for stage in STAGES:
        assert stage_counts.get(stage, 0) > 0, f"no {stage} samples: {stage_counts}"
    # Every good image was fetched, decoded and inferred once; every output was published once.
    assert stage_counts["infer"] == GOOD_COUNT
    assert stage_counts["end_to_end"] == stage_counts["publish"] == total
    lag = {(ls["topic"], ls["partition"]): v for ls, v in final.series("labelstream_consumer_lag")}
    assert lag == {(sys_.requests, str(p)): 0.0 for p in range(PARTITIONS)}
    assert final.value("labelstream_in_flight") == 0
    assert final.value("labelstream_model_load_seconds") > 0
    assert final.value("labelstream_classifier_build_seconds", taxonomy=TAXONOMY["name"]) > 0

    check_top_once(sys_.base, total)
    check_top_refreshes(sys_, tmux, worker, bucket, s3_client, sample_photos)
    assert worker.stop() == 0


def top_command(url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "labelstream.cli", "top", "--url", url, *extra]


def check_top_once(base: str, total: int) -> None:
    done = subprocess.run(top_command(base, "--once", "--interval", "0.5"), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    screen = done.stdout
    assert "health   live OK   ready OK" in screen, screen
    assert re.search(r"^throughput\s+consumed [\d.]+/s\s+labelled [\d.]+/s\s+dead-lettered [\d.]+/s", screen, re.M)
    assert re.search(rf"^totals\s+consumed {total}\s+labelled {GOOD_COUNT}\s+dead-lettered {total - GOOD_COUNT}$",
                     screen, re.M), screen
    assert "consumer lag (records)   total 0" in screen, screen
    for stage in STAGES:
        assert re.search(rf"^\s+{stage}\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+all time$", screen, re.M), screen
    assert "dead letters by code" in screen
    expected = {code: len(values) for code, values in BAD_INPUTS.items()} | {"s3.not_found": MISSING_KEYS}
    for code, count in expected.items():
        assert re.search(rf"^\s+{re.escape(code)}\s+[\d.]+/s\s+{count}$", screen, re.M), screen


@pytest.fixture
def tmux() -> Iterator[TmuxRunner]:
    with private_tmux("labelstream-ops") as run:
        yield run


def check_top_refreshes(sys_: System, tmux: Callable[..., str], worker: WorkerProcess, bucket: str,
                        s3_client: Any, sample_photos: list[Path]) -> None:
    """A live `top` in a terminal redraws as the worker labels more of the stream."""
    command = shlex.join(top_command(sys_.base, "--interval", "0.5")) + "; sleep 60"
    tmux("new-session", "-d", "-s", "top", "-x", "160", "-y", "50", "-c", str(REPO_ROOT), command)
    before = wait_for_pane(tmux, rf"^totals\s+consumed {GOOD_COUNT + BAD_COUNT}\s")
    assert "ready OK" in before and "stage latency (ms)" in before

    extra = 6
    for i in range(extra):
        key = f"more/{i}.jpg"
        s3_client.put_object(Bucket=bucket, Key=key, Body=jpeg_bytes(sample_photos[i], 1000 + i))
    produce(sys_.bootstrap, sys_.requests,
            [(i % PARTITIONS, None, s3_request(f"more-{i}", bucket, f"more/{i}.jpg")) for i in range(extra)])
    consumed, labelled = GOOD_COUNT + BAD_COUNT + extra, GOOD_COUNT + extra
    after = wait_for_pane(tmux, rf"^totals\s+consumed {consumed}\s+labelled {labelled}\s")
    worker.assert_alive()
    assert after != before
    # Redrawn in place: one frame on the screen, not a scrolling log of frames.
    assert after.count("labelstream top  ") == 1, after


# -- 2: readiness tells the truth ---------------------------------------------------------------


def broken_vision_config(target: Path) -> Path:
    """The tiny config with a 16-pixel input: convnext_atto's stride-32 trunk shrinks it to 1x1 before
    its last 2x2 downsampling conv, so every image forward raises a RuntimeError in torch, while the model
    builds and the text tower (the classifiers) works."""
    config = json.loads(TINY_CONFIG_PATH.read_text())
    config["vision_cfg"]["image_size"] = 16
    path = target / "broken-vision-clip.json"
    path.write_text(json.dumps(config))
    return path


def test_readiness_waits_for_model_and_assignment_and_turns_false_when_inference_keeps_failing(
    system: Callable[..., System], workers: list[WorkerProcess], tmp_path: Path, sample_photos: list[Path],
) -> None:
    max_failures = 2
    sys_ = system(
        partitions=2,
        LABELSTREAM_MODEL__NAME=str(broken_vision_config(tmp_path)),
        LABELSTREAM_MODEL__PRETRAINED="",  # random weights: the failure is in the shapes, not the values
        LABELSTREAM_HEALTH__MAX_INFERENCE_FAILURES=str(max_failures),
    )
    worker = start_worker(sys_.env, sys_.log_dir, "broken-model")
    workers.append(worker)

    status, first = wait_for_port(sys_.base, worker)
    assert status == 503, first
    assert first["status"] == "failing" and first["live"] is True
    # The server starts before the model loads, so the first answer names whichever step is still missing.
    assert not first["checks"]["assigned_partitions"]
    assert "no partitions assigned" in first["reasons"]
    if not first["checks"]["model_loaded"]:
        assert "model not loaded" in first["reasons"]
    live_status, live = probe(sys_.base, "/healthz")
    assert live_status == 200, live

    ready = wait_for_probe(sys_.base, "/readyz", 200, worker)
    assert ready["reasons"] == []
    assert ready["checks"]["model_loaded"] and ready["checks"]["classifiers_built"]
    assert sorted(ready["checks"]["assigned_partitions"]) == [f"{sys_.requests}:{p}" for p in range(2)]

    images = 3
    inline = [json.dumps({"id": f"img-{i}", "image": {"base64": _b64(jpeg_bytes(sample_photos[i], i))}}).encode()
              for i in range(images)]
    produced = produce(sys_.bootstrap, sys_.requests, [(0, None, value) for value in inline])
    outputs = sys_.outputs()
    try:
        assert outputs.read_until(lambda recs: len(recs) >= images, OUTPUT_TIMEOUT_S, worker.assert_alive)
        wait_for_commits(sys_.bootstrap, sys_.group, true_end_offsets(sys_.requests, produced), COMMIT_TIMEOUT_S,
                         worker.assert_alive)
        outputs.read_until_idle(idle_s=0.5)
        assert not outputs.on(sys_.labels)
        dead = outputs.on(sys_.dlq)
    finally:
        outputs.close()
    headers = [DeadLetterHeaders.from_kafka_headers(list(r.headers)) for r in dead]
    assert sorted(h.request_id or "" for h in headers) == [f"img-{i}" for i in range(images)]
    assert {(h.error_code, h.stage) for h in headers} == {("infer.failed", "infer")}
    assert all("Kernel size" in h.error_message for h in headers), [h.error_message for h in headers]

    failing = wait_for_probe(sys_.base, "/readyz", 503, worker)
    checks = failing["checks"]
    assert checks["inference_failures_in_a_row"] >= max_failures == checks["max_inference_failures"]
    assert f"inference failed {checks['inference_failures_in_a_row']} times in a row" in failing["reasons"]
    assert "Kernel size" in checks["last_inference_error"]
    assert checks["model_loaded"] and checks["assigned_partitions"]
    # Still alive and still serving: liveness stays green, only readiness says the truth.
    live_status, live = probe(sys_.base, "/healthz")
    assert live_status == 200 and live["status"] == "ok", live
    time.sleep(1.0)
    worker.assert_alive()
    assert probe(sys_.base, "/readyz")[0] == 503
    assert worker.stop() == 0


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- 3: S3 event notifications as input ---------------------------------------------------------


def aws_record(bucket: str, key: str, version_id: str | None, event: str = "ObjectCreated:Put",
               size: int = 1) -> dict[str, Any]:
    """One record as AWS sends it (event structure 2.1): the key URL-encoded, '+' for a space."""
    obj: dict[str, Any] = {"key": quote_plus(key, safe="/"), "size": size, "eTag": uuid.uuid4().hex,
                           "sequencer": "0055AED6DCD90281E5"}
    if version_id:
        obj["versionId"] = version_id
    return {
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": "2026-12-04T09:26:53.589Z", "eventName": event,
        "userIdentity": {"principalId": "AWS:AIDAJDPLRKLG7UEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "203.0.113.15"},
        "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810", "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjsk"},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "labelstream-incoming",
               "bucket": {"name": bucket, "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                          "arn": f"arn:aws:s3:::{bucket}"},
               "object": obj},
    }


def minio_event(bucket: str, key: str) -> dict[str, Any]:
    """MinIO's Kafka target: the records wrapped with EventName and Key; the record key escaped like Go's
    url.QueryEscape ('/' included)."""
    record = aws_record(bucket, key, None, event="s3:ObjectCreated:Put")
    record["s3"]["object"]["key"] = quote_plus(key, safe="")
    record["eventSource"] = "minio:s3"
    return {"EventName": "s3:ObjectCreated:Put", "Key": f"{bucket}/{key}", "Records": [record]}


def test_s3_event_notifications_become_one_label_per_created_object(
    system: Callable[..., System], workers: list[WorkerProcess], s3_client: Any,
    new_bucket: Callable[[], str], sample_photos: list[Path],
) -> None:
    sys_ = system(partitions=2)
    versioned, plain = new_bucket(), new_bucket()
    s3_client.put_bucket_versioning(Bucket=versioned, VersioningConfiguration={"Status": "Enabled"})

    def upload(bucket: str, key: str, variant: int) -> str | None:
        answer = s3_client.put_object(Bucket=bucket, Key=key, Body=jpeg_bytes(sample_photos[variant], variant))
        return answer.get("VersionId") if bucket == versioned else None

    single_keys = ["holiday photos/beach day 1.jpg", "café/日本 写真+plus.jpg"]
    fan_keys = ["fan out/first one.jpg", "fan out/zweite ü.jpg"]
    minio_key = "incoming/Größe 2 (copy).jpg"
    versions = {key: upload(versioned, key, n) for n, key in enumerate(single_keys + fan_keys)}
    assert all(versions.values()), versions
    upload(plain, minio_key, 9)
    # A second version of one object: the event names the first, so the first is what gets labelled.
    upload(versioned, single_keys[0], 10)

    removed = {"Records": [aws_record(versioned, single_keys[0], versions[single_keys[0]],
                                      event="ObjectRemoved:Delete")]}
    fan_out = {"Records": [aws_record(versioned, key, versions[key]) for key in fan_keys]}
    messages: list[tuple[int, bytes | None, bytes | None]] = [
        (0, None, json.dumps({"Records": [aws_record(versioned, key, versions[key])]}).encode())
        for key in single_keys
    ]
    messages += [(0, None, json.dumps(minio_event(plain, minio_key)).encode()),
                 (1, None, json.dumps(removed).encode()),
                 # Last on its partition: its offset can only be committed once both objects are labelled.
                 (1, None, json.dumps(fan_out).encode())]

    def expected_id(bucket: str, key: str) -> str:
        version = versions.get(key) if bucket == versioned else None
        return f"s3://{bucket}/{key}" + (f"?versionId={version}" if version else "")

    expected_ids = {expected_id(versioned, key) for key in single_keys + fan_keys} | {expected_id(plain, minio_key)}

    worker = start_worker(sys_.env, sys_.log_dir, "s3-events")
    workers.append(worker)
    wait_for_port(sys_.base, worker)
    wait_for_probe(sys_.base, "/readyz", 200, worker)
    produced = produce(sys_.bootstrap, sys_.requests, messages)
    ends = true_end_offsets(sys_.requests, produced)

    outputs = sys_.outputs()
    try:
        # Commit first, read after: whatever the committed offsets cover must already be on the topics.
        wait_for_commits(sys_.bootstrap, sys_.group, ends, OUTPUT_TIMEOUT_S, worker.assert_alive)
        assert outputs.read_until(lambda recs: len(recs) >= len(expected_ids) + 1, 10.0), outputs.records
        outputs.read_until_idle(idle_s=1.0)
        labels, dead = labels_by_id(outputs.on(sys_.labels)), outputs.on(sys_.dlq)
    finally:
        outputs.close()

    assert set(labels) == expected_ids
    assert len(outputs.on(sys_.labels)) == len(expected_ids), "one label record per created object"
    fan_sources = [labels[expected_id(versioned, key)].source for key in fan_keys]
    fan_source = {(source.partition, source.offset) for source in fan_sources if source is not None}
    assert fan_source == {(produced[-1].partition, produced[-1].offset)}, "both objects come from the one record"
    minio_label = labels[expected_id(plain, minio_key)]
    assert minio_label.metadata["s3_event"]["name"] == "s3:ObjectCreated:Put"
    assert labels[expected_id(versioned, single_keys[0])].metadata["s3_event"]["name"] == "ObjectCreated:Put"

    assert len(dead) == 1
    header = DeadLetterHeaders.from_kafka_headers(list(dead[0].headers))
    assert header.error_code == "request.s3_event_no_objects"
    assert (header.original_partition, header.original_offset) == (produced[-2].partition, produced[-2].offset)
    assert json.loads(dead[0].value) == removed, "the dead letter keeps the original value"

    final = scrape(sys_.base)
    assert final.value("labelstream_requests_consumed_total") == len(messages)
    assert final.value("labelstream_requests_labelled_total") == len(expected_ids)
    assert final.by_label("labelstream_dead_letters_total", "code") == {"request.s3_event_no_objects": 1}
    assert worker.stop() == 0
