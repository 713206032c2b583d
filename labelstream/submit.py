"""`labelstream submit`: turn local files or S3 keys into requests on the requests topic."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import boto3
from botocore.config import Config
from tqdm import tqdm

from consumers.kafka_clients import build_producer
from labelstream.sources import is_s3_uri, parse_s3_uri
from pipeline.config import S3Settings, Settings, load_settings
from pipeline.errors import FetchError, PublishError
from schemas.requests import ImageSource, Request, S3Source

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def s3_client(settings: S3Settings):  # type: ignore[no-untyped-def]
    config = Config(max_pool_connections=settings.max_pool_connections)
    return boto3.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=config)


def request_id_for(bucket: str, key: str) -> str:
    """Stable ids, so submitting the same object twice is recognisable downstream."""
    uri = f"s3://{bucket}/{key}"
    return uri if len(uri) <= 256 else "sha256:" + hashlib.sha256(uri.encode()).hexdigest()


def submit(sources: list[str], bucket: str | None, prefix: str, taxonomy: str | None, config_file: Path | None) -> int:
    settings = load_settings(config_file)
    client = s3_client(settings.s3)
    targets = list(_targets(client, sources, bucket, prefix))
    count = produce_requests(settings, targets, taxonomy)
    print(f"submitted {count} requests to {settings.topics.requests}")
    return 0


def _targets(client, sources: list[str], bucket: str | None, prefix: str) -> Iterator[tuple[str, str]]:  # type: ignore[no-untyped-def]
    for source in sources:
        if is_s3_uri(source):
            yield from _list_s3(client, *parse_s3_uri(source))
        elif bucket is None:
            raise FetchError(f"{source}: local files need --bucket to upload them to", code="request.invalid_uri")
        else:
            yield from _upload(client, Path(source), bucket, prefix)


def _list_s3(client, bucket: str, key_or_prefix: str) -> Iterator[tuple[str, str]]:  # type: ignore[no-untyped-def]
    paginator = client.get_paginator("list_objects_v2")
    found = False
    for page in paginator.paginate(Bucket=bucket, Prefix=key_or_prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/"):
                continue  # a console-created "folder" marker, not an object to label
            found = True
            yield bucket, obj["Key"]
    if not found:
        raise FetchError(f"s3://{bucket}/{key_or_prefix}: no objects", code="s3.not_found")


def _upload(client, path: Path, bucket: str, prefix: str) -> Iterator[tuple[str, str]]:  # type: ignore[no-untyped-def]
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES) if path.is_dir() else [path]
    for file in tqdm(files, desc="upload", unit="img", disable=len(files) < 2):
        # Keep the folder structure: day1/IMG_0001.jpg and day2/IMG_0001.jpg are different photos.
        key = f"{prefix}{file.relative_to(path).as_posix() if path.is_dir() else file.name}"
        client.upload_file(str(file), bucket, key)
        yield bucket, key


def produce_requests(settings: Settings, targets: list[tuple[str, str]], taxonomy: str | None) -> int:
    producer = build_producer(settings.kafka)
    try:
        futures = [
            producer.send(settings.topics.requests, key=req.id.encode(), value=req.model_dump_json().encode())
            for req in tqdm(_requests(targets, taxonomy), total=len(targets), desc="submit", unit="req")
        ]
        producer.flush(timeout=settings.kafka.produce_timeout_s)
    finally:
        producer.close()
    failed = [f for f in futures if not f.is_done or f.failed()]
    if failed:
        raise PublishError(f"{len(failed)} of {len(futures)} requests were not acknowledged")
    return len(futures)


def _requests(targets: list[tuple[str, str]], taxonomy: str | None) -> Iterator[Request]:
    for bucket, key in targets:
        yield Request(
            id=request_id_for(bucket, key),
            image=ImageSource(s3=S3Source(bucket=bucket, key=key)),
            taxonomy=taxonomy,
            metadata={"s3_uri": f"s3://{bucket}/{key}"},
        )
