"""`labelstream gallery` against label records from a real worker run (real broker, real S3)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from labelstream.cli import main as cli_main
from labelstream.embedded import create_topic
from labelstream.evaluation.cli import duration_seconds
from labelstream.evaluation.gallery import image_location
from schemas.labels import LabelRecord
from schemas.requests import ImageSource, Request, S3Source
from tests.worker_process import produce, start_worker

PHOTOS = 6
TAXONOMY = """
name: scenes
templates: ["a photo of {}."]
top_k: 3
classes: [a building, a flower, a woven textile, a dog, a beach]
"""
LABELLED_TIMEOUT_S = 120


def label_record(record_id: str, metadata: dict[str, Any]) -> LabelRecord:
    return LabelRecord.model_validate({
        "id": record_id, "metadata": metadata, "model": {"name": "m", "pretrained": None},
        "taxonomy": {"name": "t", "version": "v"}, "labels": [{"label": "dog", "score": 0.9}], "source": None,
        "timings_ms": {"fetch": 0, "decode": 0, "infer": 0, "total": 0},
    })


def test_image_location_rule() -> None:
    assert image_location(label_record("x", {"s3_uri": "s3://b/k.jpg"})) == "s3://b/k.jpg"
    assert image_location(label_record("s3://b/id.jpg", {})) == "s3://b/id.jpg"
    assert image_location(label_record("x", {"s3_uri": "http://elsewhere/k.jpg"})) is None
    assert image_location(label_record("plain-id", {})) is None


def test_duration_parsing() -> None:
    assert duration_seconds("1h") == 3600 and duration_seconds("30m") == 1800 and duration_seconds("90s") == 90


@pytest.mark.timeout(300)
def test_gallery_from_a_real_worker_run(
    broker: Any, s3_server: Any, s3_client: Any, new_bucket: Callable[[], str], unique_id: str,
    worker_env: Callable[..., dict[str, str]], sample_photos: list[Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topics = {name: f"ls-gallery-{name}-{unique_id}" for name in ("requests", "labels", "embeddings", "dlq", "taxonomies")}
    for name, topic in topics.items():
        create_topic(broker.bootstrap, topic, 2 if name in ("requests", "labels") else 1)
    bucket = new_bucket()
    (tmp_path / "scenes.yaml").write_text(TAXONOMY)
    env = worker_env(
        **{f"LABELSTREAM_TOPICS__{name.upper()}": topic for name, topic in topics.items()},
        LABELSTREAM_KAFKA__GROUP_ID=f"gallery-{unique_id}",
        LABELSTREAM_TAXONOMY__PATH=str(tmp_path / "scenes.yaml"),
    )
    for key in ("LABELSTREAM_KAFKA__BOOTSTRAP_SERVERS", "LABELSTREAM_S3__ENDPOINT_URL", "LABELSTREAM_TOPICS__REQUESTS",
                "LABELSTREAM_TOPICS__LABELS", "LABELSTREAM_LOG__FORMAT"):
        monkeypatch.setenv(key, env[key])

    # `labelstream submit` uploads the photos and puts each one's s3_uri in the request metadata.
    assert cli_main(["submit", *map(str, sample_photos[:PHOTOS]), "--bucket", bucket, "--prefix", "today/"]) == 0
    # A request from another producer, without s3_uri and with a plain id: labelled, but no thumbnail.
    s3_client.upload_file(str(sample_photos[0]), bucket, "other/photo.jpg")
    plain = Request(id=f"plain-{unique_id}", image=ImageSource(s3=S3Source(bucket=bucket, key="other/photo.jpg")))
    produce(broker.bootstrap, topics["requests"], [(0, plain.id.encode(), plain.model_dump_json().encode())])

    worker = start_worker(env, tmp_path, "gallery-worker")
    try:
        worker.wait_for_events("labelled", PHOTOS + 1, LABELLED_TIMEOUT_S)
        assert worker.stop() == 0
    finally:
        worker.kill()
    labels = {e["top"] for e in worker.events("labelled") if "top" in e}

    out = tmp_path / "gallery.html"
    code = cli_main(["gallery", "--topic", topics["labels"], "--since", "1h", "--report", str(out), "--idle-timeout", "2"])
    structlog.reset_defaults()
    assert code == 0
    html = out.read_text()
    assert re.search(r"<td>label records</td><td>7</td>", html), html[:2000]
    assert re.search(r"<td>records with an image location</td><td>6</td>", html)
    for heading in ("Score distribution per label", "Lowest-confidence records", "Sample per label"):
        assert f"<h2>{heading}</h2>" in html
    for label in labels:
        assert label in html
    thumbnails = html.count('<img src="data:image/jpeg')
    assert thumbnails >= PHOTOS  # every submitted photo appears at least once, fetched from S3
    assert "(no image)" in html  # the plain request's record
    assert "http://" not in html and "https://" not in html

    # A window that ends before the run finds nothing.
    code = cli_main(["gallery", "--topic", topics["labels"], "--since", "1s", "--report", str(out), "--idle-timeout", "1"])
    structlog.reset_defaults()
    assert code == 0
    assert re.search(r"<td>label records</td><td>0</td>", out.read_text())


def test_gallery_names_an_unknown_topic(broker: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LABELSTREAM_KAFKA__BOOTSTRAP_SERVERS", broker.bootstrap)
    code = cli_main(["gallery", "--topic", "no-such-topic-here", "--report", str(tmp_path / "g.html"), "--idle-timeout", "1"])
    structlog.reset_defaults()
    assert code == 2
    assert "no-such-topic-here" in capsys.readouterr().err
