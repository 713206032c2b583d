"""Image inputs: what a string in `input` may name, checked for all inputs before any is fetched.

Three forms: an http(s) URL (fetched by the worker's fetcher, with its SSRF
rules and `fetch.url_enabled`), a `data:image/...;base64,` URI (capped by
`fetch.max_inline_bytes`) and `s3://bucket/key` (the configured S3, and
`s3.allowed_buckets`). Decoding uses the Labeler's preprocessor, so the
format allowlist, size limits and decompression-bomb checks are the worker's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from api.errors import ApiError
from pipeline.config import Settings
from schemas.requests import ImageSource, S3Source

_DATA_URI = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,(?P<payload>.*)$", re.DOTALL)


@dataclass(frozen=True)
class ImageInput:
    index: int
    source: ImageSource

    @property
    def param(self) -> str:
        return f"input.{self.index}"


def parse_image_inputs(values: list[str], settings: Settings) -> list[ImageInput]:
    """Every input parsed and size-checked; the first bad one is a 400/413 naming it."""
    return [ImageInput(index, _parse(value, index, settings)) for index, value in enumerate(values)]


def _parse(value: str, index: int, settings: Settings) -> ImageSource:
    param = f"input.{index}"
    if value.startswith("data:"):
        return _data_uri(value, param, settings.fetch.max_inline_bytes)
    if value.startswith("s3://"):
        return _s3_uri(value, param, settings)
    if value.lower().startswith(("http://", "https://")):
        if not settings.fetch.url_enabled:
            raise ApiError(400, "fetching images by URL is disabled on this server (fetch.url_enabled)",
                           code="url.disabled", param=param)
        if len(value) > 4096:
            raise ApiError(400, "URL is longer than 4096 characters", code="url.invalid", param=param)
        return ImageSource(url=value)
    raise ApiError(400, "an image input must be an http(s) URL, a data:image/...;base64, URI or an s3://bucket/key URI",
                   code="image.unsupported_source", param=param)


def _data_uri(value: str, param: str, max_bytes: int) -> ImageSource:
    match = _DATA_URI.match(value)
    if match is None:
        raise ApiError(400, "a data URI must look like data:image/<type>;base64,<payload>", code="image.invalid_data_uri",
                       param=param)
    payload = match.group("payload")
    # Four characters decode to at most three bytes: refuse before decoding.
    if len(payload) > 4 * (max_bytes // 3 + 2):
        raise ApiError(413, f"inline image is over the {max_bytes}-byte limit (fetch.max_inline_bytes)",
                       code="fetch.too_large", param=param)
    if not payload:
        raise ApiError(400, "the data URI holds no bytes", code="image.empty", param=param)
    try:
        return ImageSource.model_validate({"base64": payload}, context={"max_inline_bytes": max_bytes})
    except ValueError:
        raise ApiError(400, "the data URI's payload is not valid base64", code="request.invalid_base64",
                       param=param) from None


def _s3_uri(value: str, param: str, settings: Settings) -> ImageSource:
    bucket, _, key = value[len("s3://"):].partition("/")
    if not bucket or not key:
        raise ApiError(400, "an S3 input must look like s3://bucket/key", code="request.invalid_uri", param=param)
    allowed = settings.s3.allowed_buckets
    if allowed and bucket not in allowed:
        raise ApiError(400, f"bucket {bucket!r} is not in s3.allowed_buckets", code="s3.bucket_not_allowed", param=param)
    try:
        return ImageSource(s3=S3Source(bucket=bucket, key=key))
    except ValueError as exc:
        raise ApiError(400, f"invalid S3 location: {exc}", code="request.invalid_uri", param=param) from None
