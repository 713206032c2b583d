"""Turning a raw Kafka record into a validated request (the parse/validate stage).

Every way a record can be unusable ends here as a RequestError with a stable
code; nothing else may escape, because an exception on the poll thread would
take the worker down and make the record a poison pill on every restart.

Codes: request.empty, request.too_large, request.not_utf8, request.invalid_json,
request.too_deep (stage parse); request.invalid, request.s3_event_invalid,
request.s3_event_no_objects (stage validate).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from pipeline.errors import RequestError
from schemas.requests import Request
from schemas.s3_events import is_s3_event, requests_from_s3_event

# Room for the id, taxonomy and metadata beside the largest inline image.
REQUEST_OVERHEAD_BYTES = 1024 * 1024
# Deeper JSON is refused: pydantic cannot serialise it into the label record
# beyond a few hundred levels, and no real metadata needs it.
MAX_JSON_DEPTH = 64


def max_request_bytes(max_inline_bytes: int) -> int:
    """The largest record value accepted: a maximal base64 image plus overhead."""
    return 4 * (max_inline_bytes // 3 + 2) + REQUEST_OVERHEAD_BYTES


def parse_requests(value: bytes | None, max_inline_bytes: int) -> list[Request]:
    """One record is one request, or, for an S3 event notification, one per ObjectCreated record."""
    document = _parse_json(value, max_request_bytes(max_inline_bytes))
    if is_s3_event(document):
        return _requests_from_event(document)
    return [_validate(document, max_inline_bytes)]


def _requests_from_event(document: Any) -> list[Request]:
    event = requests_from_s3_event(document)
    if not event.requests:
        # Deletions, tagging changes, test events: nothing to label, but the
        # record still needs a terminal answer saying so.
        raise RequestError(f"S3 event has no ObjectCreated record (skipped: {', '.join(event.skipped_events)})",
                           code="request.s3_event_no_objects")
    for request in event.requests:
        _check_encodable(request)
    return list(event.requests)


def parse_request(value: bytes | None, max_inline_bytes: int) -> Request:
    document = _parse_json(value, max_request_bytes(max_inline_bytes))
    return _validate(document, max_inline_bytes)


def _validate(document: Any, max_inline_bytes: int) -> Request:
    try:
        request = Request.model_validate(document, context={"max_inline_bytes": max_inline_bytes})
    except ValidationError as exc:
        raise RequestError(f"request does not match the schema: {_summarise(exc)}", code="request.invalid") from exc
    _check_encodable(request)
    return request


def _parse_json(value: bytes | None, limit: int) -> Any:
    if value is None:
        raise RequestError("record has no value (tombstone)", code="request.empty", stage="parse")
    if len(value) > limit:
        raise RequestError(f"record value is {len(value)} bytes, over the {limit}-byte limit",
                           code="request.too_large", stage="parse")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"record value is not UTF-8: {exc}", code="request.not_utf8", stage="parse") from exc
    try:
        document = json.loads(text)
    except RecursionError:
        raise RequestError("record value nests too deeply to parse", code="request.too_deep", stage="parse") from None
    except ValueError as exc:
        # JSONDecodeError, and also e.g. an integer literal over Python's digit limit.
        raise RequestError(f"record value is not JSON: {exc}", code="request.invalid_json", stage="parse") from exc
    if _nests_deeper_than(document, MAX_JSON_DEPTH):
        raise RequestError(f"record value nests deeper than {MAX_JSON_DEPTH} levels", code="request.too_deep",
                           stage="parse")
    return document


def _nests_deeper_than(document: Any, limit: int) -> bool:
    # Iterative, so the check itself cannot hit the recursion limit.
    stack = [(document, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _check_encodable(request: Request) -> None:
    # JSON may carry lone surrogates ("\ud800"), which are not Unicode: they
    # would make every output record (and the dead letter's headers) fail to
    # encode later, on the publish path. Refuse them here instead.
    try:
        request.model_dump_json()
    except (PydanticSerializationError, UnicodeError, ValueError) as exc:
        raise RequestError(f"request cannot be re-encoded as UTF-8 JSON: {exc}", code="request.invalid") from None


def _summarise(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors(include_url=False)
    )
