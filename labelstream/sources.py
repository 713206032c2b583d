"""Parsing the image arguments users give the CLI: local paths or s3:// URIs."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from pipeline.errors import FetchError
from schemas.requests import ImageSource, S3Source


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key); the key may be empty (a whole bucket)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise FetchError(f"not an s3:// URI: {uri}", code="request.invalid_uri", stage="validate")
    return parsed.netloc, parsed.path.lstrip("/")


def is_s3_uri(value: str) -> bool:
    return value.startswith("s3://")


def read_local_image(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise FetchError(f"{path} is {size} bytes, over the {max_bytes}-byte limit", code="fetch.too_large")
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise FetchError(f"{path}: no such file", code="file.not_found") from exc
    except OSError as exc:
        raise FetchError(f"{path}: {exc}", code="file.unreadable") from exc


def s3_source(uri: str) -> ImageSource:
    bucket, key = parse_s3_uri(uri)
    return ImageSource(s3=S3Source(bucket=bucket, key=key))
