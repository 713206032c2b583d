"""`labelstream submit` as a user runs it: a subprocess against the real broker and S3 server."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kafka.consumer.fetcher import ConsumerRecord

from schemas.requests import Request
from tests.worker_process import read_all

REPO_ROOT = Path(__file__).resolve().parent.parent
SUBMIT_TIMEOUT_S = 120


def run_submit(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "labelstream.cli", "submit", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=SUBMIT_TIMEOUT_S, check=False,
    )


def requests_in(records: list[ConsumerRecord]) -> list[Request]:
    parsed = [Request.model_validate_json(record.value) for record in records]
    assert [r.key for r in records] == [req.id.encode() for req in parsed]
    return parsed


def object_bytes(s3_client: Any, bucket: str, key: str) -> bytes:
    return s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_submit_uploads_local_files_and_directories_then_produces_requests(
    broker: Any,
    s3_client: Any,
    new_bucket: Callable[[], str],
    new_topic: Callable[..., str],
    worker_env: Callable[..., dict[str, str]],
    sample_photos: list[Path],
    tmp_path: Path,
) -> None:
    topic, bucket = new_topic(3), new_bucket()
    folder = tmp_path / "album"
    folder.mkdir()
    for photo in sample_photos[2:5]:
        shutil.copyfile(photo, folder / photo.name)
    (folder / "notes.txt").write_text("not an image")
    single = sample_photos[0]
    local = {single.name: single, **{p.name: p for p in folder.glob("*.jpg")}}

    result = run_submit(worker_env(LABELSTREAM_TOPICS__REQUESTS=topic),
                        str(single), str(folder), "--bucket", bucket, "--prefix", "up/", "--taxonomy", "everyday")

    assert result.returncode == 0, result.stderr
    assert f"submitted 4 requests to {topic}" in result.stdout
    requests = requests_in(read_all(broker.bootstrap, topic))
    assert sorted(r.image.s3.key for r in requests if r.image.s3) == sorted(f"up/{name}" for name in local)
    for request in requests:
        s3 = request.image.s3
        assert s3 is not None and s3.bucket == bucket
        assert request.id == f"s3://{bucket}/{s3.key}"
        assert request.taxonomy == "everyday"
        assert request.metadata == {"s3_uri": f"s3://{bucket}/{s3.key}"}
        assert object_bytes(s3_client, bucket, s3.key) == local[s3.key.removeprefix("up/")].read_bytes()
    uploaded = s3_client.list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(o["Key"] for o in uploaded) == sorted(f"up/{name}" for name in local)


def test_submit_directory_tree_keeps_files_with_the_same_name_apart(
    broker: Any,
    s3_client: Any,
    new_bucket: Callable[[], str],
    new_topic: Callable[..., str],
    worker_env: Callable[..., dict[str, str]],
    sample_photos: list[Path],
    tmp_path: Path,
) -> None:
    """Cameras name files IMG_0001.jpg in every folder; one upload must not overwrite another."""
    topic, bucket = new_topic(1), new_bucket()
    sources = {}
    for folder, photo in (("day1", sample_photos[0]), ("day2", sample_photos[1])):
        (tmp_path / "trip" / folder).mkdir(parents=True)
        sources[folder] = tmp_path / "trip" / folder / "IMG_0001.jpg"
        shutil.copyfile(photo, sources[folder])

    result = run_submit(worker_env(LABELSTREAM_TOPICS__REQUESTS=topic), str(tmp_path / "trip"), "--bucket", bucket)

    assert result.returncode == 0, result.stderr
    requests = requests_in(read_all(broker.bootstrap, topic))
    assert len({r.id for r in requests}) == 2, f"duplicate request ids: {[r.id for r in requests]}"
    uploaded = {r.image.s3.key: object_bytes(s3_client, bucket, r.image.s3.key) for r in requests if r.image.s3}
    assert sorted(uploaded.values()) == sorted(path.read_bytes() for path in sources.values())


def test_submit_s3_prefix_references_only_existing_keys_under_it(
    broker: Any,
    s3_client: Any,
    new_bucket: Callable[[], str],
    new_topic: Callable[..., str],
    worker_env: Callable[..., dict[str, str]],
    sample_photos: list[Path],
) -> None:
    topic, bucket = new_topic(1), new_bucket()
    inside = ["batch/a.jpg", "batch/b.jpg", "batch/deeper/c.jpg"]
    for key in [*inside, "other/d.jpg", "batchmate.jpg"]:
        s3_client.upload_file(str(sample_photos[0]), bucket, key)
    before = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]}

    result = run_submit(worker_env(LABELSTREAM_TOPICS__REQUESTS=topic), f"s3://{bucket}/batch/")

    assert result.returncode == 0, result.stderr
    assert f"submitted {len(inside)} requests to {topic}" in result.stdout
    requests = requests_in(read_all(broker.bootstrap, topic))
    assert sorted((r.image.s3.bucket, r.image.s3.key) for r in requests if r.image.s3) == [(bucket, k) for k in inside]
    assert all(r.taxonomy is None for r in requests)
    # Referencing keys must not upload or rewrite anything.
    assert {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]} == before


def test_submit_s3_uri_without_objects_fails_clearly_and_produces_nothing(
    broker: Any,
    s3_client: Any,
    new_bucket: Callable[[], str],
    new_topic: Callable[..., str],
    worker_env: Callable[..., dict[str, str]],
    sample_photos: list[Path],
) -> None:
    topic, bucket = new_topic(1), new_bucket()
    s3_client.upload_file(str(sample_photos[0]), bucket, "present/a.jpg")
    uri = f"s3://{bucket}/absent/"

    result = run_submit(worker_env(LABELSTREAM_TOPICS__REQUESTS=topic), uri)

    assert result.returncode != 0
    assert uri in result.stderr and "no objects" in result.stderr
    assert "Traceback" not in result.stderr
    assert read_all(broker.bootstrap, topic) == []
