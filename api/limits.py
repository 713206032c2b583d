"""Request limits: the body size (an ASGI middleware, before any parsing) and the number of inputs."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError
from schemas.openai import ErrorBody, ErrorDetail


class BodySizeLimit:
    """Reads the whole body (at most `max_bytes`) before the app runs; more gets 413 in OpenAI's shape.

    A declared Content-Length over the limit is refused before reading a byte.
    After the body, `receive` is the server's own again, so the app can still
    learn that the client disconnected.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _declared_length(scope) > self.max_bytes:
            await self._refuse(send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replaying(bytes(body), receive), send)

    async def _refuse(self, send: Send) -> None:
        detail = ErrorDetail(message=f"request body is over the {self.max_bytes}-byte limit (http.max_body_bytes)",
                             type="invalid_request_error", code="request.too_large")
        payload = json.dumps(ErrorBody(error=detail).model_dump()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _replaying(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def as_inputs(value: str | list[str], max_inputs: int) -> list[str]:
    """The request's inputs as a list, refused (400) when empty or over `http.max_inputs`."""
    inputs = [value] if isinstance(value, str) else list(value)
    if not inputs:
        raise ApiError(400, "input must not be empty", code="input.empty", param="input")
    if len(inputs) > max_inputs:
        raise ApiError(400, f"{len(inputs)} inputs is more than the {max_inputs} allowed per request (http.max_inputs)",
                       code="input.too_many", param="input")
    for index, text in enumerate(inputs):
        if not text:
            raise ApiError(400, "an input must not be an empty string", code="input.empty", param=f"input.{index}")
    return inputs
