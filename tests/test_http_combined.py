"""`labelstream run --http`: one process, one model, Kafka and HTTP items in the same batches.

A real worker subprocess consumes a backlog from the Tansu broker while 20
HTTP requests arrive; its /metrics shows that items of both kinds shared
model batches. /v1/classify answers with the scores of the worker's own label
record for the same S3 image, by taxonomy name and by inline labels.
"""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from schemas.requests import ImageSource, Request, S3Source
from tests.worker_process import REPO_ROOT, OutputCollector, WorkerProcess, produce

KEY = "sk-combined-test"
TAXONOMY = "combined-objects"
CLASSES = ["dog", "cat", "flower", "textile", "city street"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}."]
BACKLOG = 500
CONCURRENT = 20
PARTITIONS = 3


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_http_worker(env: dict[str, str], log_dir: Path) -> WorkerProcess:
    stdout_path, stderr_path = log_dir / "http-worker.stdout", log_dir / "http-worker.stderr"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "labelstream.cli", "run", "--http"], cwd=REPO_ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    return WorkerProcess("http-worker", proc, stdout_path, stderr_path)


def request_value(request_id: str, bucket: str, key: str) -> bytes:
    return Request(id=request_id, image=ImageSource(s3=S3Source(bucket=bucket, key=key)), taxonomy=TAXONOMY,
                   metadata={}).model_dump_json().encode()


def scrape(url: str, name: str, **labels: str) -> float:
    """One sample from the worker's /metrics text (0 when the series does not exist yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def classify(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/v1/classify", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def label_scores(record: dict[str, Any]) -> list[tuple[str, float]]:
    return [(entry["label"], entry["score"]) for entry in record["labels"]]


def test_run_http_shares_one_model_and_its_batches(
    worker_env: Callable[..., dict[str, str]], new_topic: Callable[..., str], new_bucket: Callable[[], str],
    s3_client: Any, broker: Any, sample_photos: list[Path], tmp_path: Path, unique_id: str,
) -> None:
    bucket = new_bucket()
    keys = [f"photos/{index}-{path.name}" for index, path in enumerate(sample_photos)]
    for key, path in zip(keys, sample_photos, strict=True):
        s3_client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
    taxonomy_path = tmp_path / "objects.yaml"
    taxonomy_path.write_text(yaml.safe_dump({"name": TAXONOMY, "templates": TEMPLATES, "classes": CLASSES, "top_k": 3}))
    requests_topic, labels_topic = new_topic(PARTITIONS), new_topic(PARTITIONS)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = worker_env(
        LABELSTREAM_TOPICS__REQUESTS=requests_topic, LABELSTREAM_TOPICS__LABELS=labels_topic,
        LABELSTREAM_TOPICS__EMBEDDINGS=new_topic(PARTITIONS), LABELSTREAM_TOPICS__DLQ=new_topic(1),
        LABELSTREAM_TOPICS__TAXONOMIES=new_topic(1), LABELSTREAM_KAFKA__GROUP_ID=f"http-{unique_id}",
        LABELSTREAM_TAXONOMY__PATH=str(taxonomy_path), LABELSTREAM_TAXONOMY__FEED_ENABLED="false",
        LABELSTREAM_TAXONOMY__WATCH_INTERVAL_S="0",
        # Every Kafka item must reach the model: no content-hash shortcut for repeated images.
        LABELSTREAM_CACHE__MAX_ENTRIES="0", LABELSTREAM_BATCH__MAX_SIZE="16",
        LABELSTREAM_HTTP__HOST="127.0.0.1", LABELSTREAM_HTTP__PORT=str(port),
        LABELSTREAM_HTTP__API_KEYS=json.dumps([KEY]),
    )  # fmt: skip
    worker = start_http_worker(env, tmp_path)
    outputs = OutputCollector(broker.bootstrap, labels_topic)
    try:
        worker.wait_for_event("http_listening", timeout_s=120)
        _classify_matches_the_label_record(worker, outputs, broker.bootstrap, requests_topic, bucket, keys[0], url)
        _shares_batches_under_a_backlog(worker, outputs, broker.bootstrap, requests_topic, bucket, keys, url)
        # One process and one model: a single model load, and one registry counting both kinds of items.
        assert len(worker.events("model_ready")) == 1
        assert worker.stop(timeout_s=60) == 0
    finally:
        worker.kill()
        outputs.close()


def _classify_matches_the_label_record(worker: WorkerProcess, outputs: OutputCollector, bootstrap: str, topic: str,
                                       bucket: str, key: str, url: str) -> None:
    produce(bootstrap, topic, [(0, b"parity", request_value("parity", bucket, key))])
    assert outputs.read_until(lambda records: any(r.key == b"parity" for r in records), 120, worker.assert_alive), \
        worker.tail()
    record = json.loads(next(r for r in outputs.records if r.key == b"parity").value)
    by_name = classify(url, {"input": f"s3://{bucket}/{key}", "taxonomy": TAXONOMY})
    inline = classify(url, {"input": [f"s3://{bucket}/{key}"], "labels": CLASSES, "templates": TEMPLATES, "top_k": 3})
    for response in (by_name, inline):
        assert response.status_code == 200, response.text
        [item] = response.json()["data"]
        got = [(entry["label"], entry["score"]) for entry in item["labels"]]
        assert [label for label, _ in got] == [label for label, _ in label_scores(record)]
        assert [score for _, score in got] == pytest.approx([s for _, s in label_scores(record)], abs=1e-5)
    assert by_name.json()["data"][0]["taxonomy"] == record["taxonomy"]


def _shares_batches_under_a_backlog(worker: WorkerProcess, outputs: OutputCollector, bootstrap: str, topic: str,
                                    bucket: str, keys: list[str], url: str) -> None:
    mixed_before = scrape(url, "labelstream_mixed_batches_total")
    http_before = scrape(url, "labelstream_batch_items_total", source="http")
    kafka_before = scrape(url, "labelstream_batch_items_total", source="kafka")
    backlog = [(index % PARTITIONS, f"b-{index}".encode(), request_value(f"b-{index}", bucket, key))
               for index, key in zip(range(BACKLOG), itertools.cycle(keys))]  # fmt: skip
    produce(bootstrap, topic, backlog)
    # Consumption has begun: the HTTP requests arrive while the backlog is being worked through.
    assert outputs.read_until(lambda records: any(r.key.startswith(b"b-") for r in records), 120, worker.assert_alive)
    picked = itertools.islice(itertools.cycle(keys), CONCURRENT)
    bodies = [{"input": f"s3://{bucket}/{key}", "taxonomy": TAXONOMY} for key in picked]
    with ThreadPoolExecutor(CONCURRENT) as pool:
        responses = list(pool.map(lambda body: classify(url, body), bodies))
    assert [r.status_code for r in responses] == [200] * CONCURRENT, [r.text for r in responses if r.status_code != 200]
    assert all(len(r.json()["data"][0]["labels"]) == 3 for r in responses)
    backlog_ids = {f"b-{index}".encode() for index in range(BACKLOG)}
    assert outputs.read_until(lambda records: backlog_ids <= {r.key for r in records}, 300, worker.assert_alive), \
        worker.tail()
    assert scrape(url, "labelstream_batch_items_total", source="http") - http_before == CONCURRENT
    assert scrape(url, "labelstream_batch_items_total", source="kafka") - kafka_before >= BACKLOG
    assert scrape(url, "labelstream_mixed_batches_total") > mixed_before
    # The backlog made nothing wait in the HTTP lane for long: it is empty again.
    assert scrape(url, "labelstream_http_queue_depth") == 0
