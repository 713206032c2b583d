"""The request: one image reference to label, as put on the requests topic."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# Used when validation runs without the worker's configured cap in context.
DEFAULT_MAX_INLINE_BYTES = 8 * 1024 * 1024


class S3Source(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    bucket: str = Field(min_length=3, max_length=63)
    key: str = Field(min_length=1, max_length=1024)
    version_id: str | None = None


# JSON Schema readers cannot see the model validator, so state "exactly one source" for them too.
_EXACTLY_ONE_SOURCE = {
    "oneOf": [
        {"required": ["s3"], "properties": {"s3": {"type": "object"}}},
        {"required": ["url"], "properties": {"url": {"type": "string"}}},
        {"required": ["base64"], "properties": {"base64": {"type": "string"}}},
    ]
}


class ImageSource(BaseModel):
    """Exactly one of `s3`, `url` or `base64`."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=_EXACTLY_ONE_SOURCE)

    s3: S3Source | None = None
    url: str | None = Field(None, min_length=1, max_length=4096)
    base64: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ImageSource:
        given = [name for name in ("s3", "url", "base64") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"image must have exactly one source of s3, url, base64; got {given or 'none'}")
        return self

    @field_validator("url")
    @classmethod
    def _http_only(cls, url: str | None) -> str | None:
        if url is not None and not url.lower().startswith(("http://", "https://")):
            raise ValueError("url must be http:// or https://")
        return url

    @field_validator("base64")
    @classmethod
    def _inline_within_cap(cls, payload: str | None, info: ValidationInfo) -> str | None:
        if payload is None:
            return None
        cap = (info.context or {}).get("max_inline_bytes", DEFAULT_MAX_INLINE_BYTES)
        # Check the decoded size before decoding: 3 bytes per 4 characters, less the padding.
        if len(payload) * 3 // 4 - payload[-2:].count("=") > cap:
            raise ValueError(f"base64 payload decodes to more than the {cap}-byte inline cap")
        try:
            base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"base64 payload does not decode: {exc}") from None
        return payload

    def describe(self) -> str:
        """A short, log-safe description (never the inline bytes)."""
        if self.s3 is not None:
            version = f"?versionId={self.s3.version_id}" if self.s3.version_id else ""
            return f"s3://{self.s3.bucket}/{self.s3.key}{version}"
        if self.url is not None:
            return self.url
        return f"base64:{len(self.base64 or '')}chars"


class Request(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1, max_length=256)
    image: ImageSource
    taxonomy: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _id_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("id must not be blank")
        return value
