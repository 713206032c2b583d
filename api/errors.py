"""Every error the API answers, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

FastAPI's own answers (validation errors, unknown paths, wrong methods) are
rewritten into the same shape, and pipeline errors (fetch, decode, taxonomy)
keep their stable labelstream code, with an HTTP status chosen by that code.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.errors import LabelstreamError
from schemas.openai import ErrorBody, ErrorDetail

log = structlog.get_logger("labelstream.api")

INVALID = "invalid_request_error"
_TYPES_BY_STATUS = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error", 502: "server_error",
                    503: "server_error", 504: "server_error"}
# Pipeline error codes whose status is not 400.
_STATUS_BY_CODE = {
    "fetch.too_large": 413,
    "image.too_large": 413,
    "image.decompression_bomb": 413,
    "taxonomy.unknown": 404,
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:  # noqa: A002 - OpenAI's name
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type or _TYPES_BY_STATUS.get(status, INVALID)
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, type=self.type, code=self.code, param=self.param,
                              headers=self.headers)


def error_response(status: int, message: str, *, type: str | None = None, code: str | None = None,  # noqa: A002
                   param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    detail = ErrorDetail(message=message, type=type or _TYPES_BY_STATUS.get(status, INVALID), param=param, code=code)
    return JSONResponse(ErrorBody(error=detail).model_dump(), status_code=status, headers=headers)


def from_pipeline(exc: LabelstreamError, param: str | None = None) -> ApiError:
    """A fetch, decode or taxonomy failure of one input, as the answer to the whole request."""
    if exc.code in _STATUS_BY_CODE:
        status = _STATUS_BY_CODE[exc.code]
    elif exc.stage == "infer" or exc.code.startswith("internal."):
        status = 500
    elif exc.retryable:
        # S3 or a URL is down or slow: the input may be fine, the upstream is not.
        status = 502
    else:
        status = 400
    return ApiError(status, exc.message, code=exc.code, param=param)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    param = _param_of(first.get("loc", ()))
    message = "; ".join(f"{_param_of(e.get('loc', ())) or 'body'}: {e.get('msg', 'invalid')}" for e in errors[:5])
    return error_response(400, message or "invalid request body", code="invalid_request", param=param)


def _param_of(loc: Any) -> str | None:
    # ("body", "input", 3) -> "input.3"; pydantic's union branch names ("str", "list[str]") say nothing to users.
    parts = [str(p) for p in loc if p != "body" and not str(p).startswith(("str", "list["))]
    return ".".join(parts) or None


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("http_unexpected_error", path=request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}", code="internal.unexpected")
