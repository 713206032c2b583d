"""Turning a raw Kafka record into a validated request (the parse/validate stage)."""

from __future__ import annotations

import json

from pydantic import ValidationError

from pipeline.errors import RequestError
from schemas.requests import Request


def parse_request(value: bytes | None, max_inline_bytes: int) -> Request:
    if value is None:
        raise RequestError("record has no value (tombstone)", code="request.empty", stage="parse")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"record value is not UTF-8: {exc}", code="request.not_utf8", stage="parse") from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"record value is not JSON: {exc}", code="request.invalid_json", stage="parse") from exc
    try:
        return Request.model_validate(document, context={"max_inline_bytes": max_inline_bytes})
    except ValidationError as exc:
        raise RequestError(f"request does not match the schema: {_summarise(exc)}", code="request.invalid") from exc


def _summarise(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors(include_url=False)
    )
