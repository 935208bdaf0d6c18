"""ASGI middleware: API keys, body limits, request ids and the one structured log line per request.

Written as plain ASGI callables (not Starlette's BaseHTTPMiddleware) so they stream responses untouched and
can refuse a request before its body is read.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.errors import APIError, BodyReadTimeoutError, RequestTooLargeError, error_body

access_logger = logging.getLogger("backend.access")

# Routes anyone may call: probes, metrics, the web page and its files.
OPEN_PATHS = {"/health", "/ping", "/metrics", "/", "/favicon.ico"}
OPEN_PREFIXES = ("/static/",)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


async def send_error(send: Send, status: int, body: dict, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Answer with an error envelope directly at the ASGI level."""
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class ApiKeyMiddleware:
    """When API keys are set, every route but the open ones needs `Authorization: Bearer <key>`.

    Keys are compared in constant time, all of them every time, so timing tells nothing about which key or
    how much of one matched. Keys are never logged. CORS preflights (OPTIONS) carry no credentials and pass.
    """

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self._keys = [key.encode() for key in keys]

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return False
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(token, key)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        authorized = self._authorized(header)
        # Open routes run either way; they may show more to a caller with a key (/health's details).
        scope.setdefault("state", {})["authorized"] = authorized
        path = scope["path"]
        if authorized or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        message = "Missing API key: send `Authorization: Bearer <key>`." if not header else "Invalid API key."
        scope.setdefault("state", {})["log"] = {"auth": "refused"}
        await send_error(
            send,
            401,
            error_body(message, "invalid_request_error", code="invalid_api_key"),
            [(b"www-authenticate", b"Bearer")],
        )


class BodyLimitMiddleware:
    """Read the body first, within MAX_REQUEST_BYTES (413) and BODY_READ_TIMEOUT_SECONDS in all (408).

    A declared Content-Length over the limit is refused before a byte of the body is read. The body is then
    read here, as FastAPI would read it anyway for JSON, and handed to the app; a client that sends it too
    slowly (slow loris, even one byte every few seconds) is cut off when the whole deadline has passed.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout_seconds: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout_seconds

    async def _refuse(self, send: Send, error: APIError) -> None:
        await send_error(send, error.status_code, {"error": error.to_dict()}, [(b"connection", b"close")])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send, RequestTooLargeError(self.max_bytes))
        pieces: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.read_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left before sending its request: nobody to answer
                    size += len(message.get("body", b""))
                    if size > self.max_bytes:
                        return await self._refuse(send, RequestTooLargeError(self.max_bytes))
                    pieces.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            error = BodyReadTimeoutError(
                f"The request body was not received within {self.read_timeout:g} s (BODY_READ_TIMEOUT_SECONDS).",
                code="body_timeout",
            )
            return await self._refuse(send, error)
        body = b"".join(pieces)
        handed_over = False

        async def replay() -> Message:
            nonlocal handed_over
            if not handed_over:
                handed_over = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only the disconnect, whenever it comes

        await self.app(scope, replay, send)


class RequestContextMiddleware:
    """Give each request an id (the client's `X-Request-ID` if sane, else a new one), echo it, and write one
    structured log line when the response ends: route, status, duration, and what the handler added
    (tokens, images, queue / time to first token, client disconnect)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state.setdefault("log", {})
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            fields = {
                "request_id": request_id,
                "method": scope["method"],
                "route": scope["path"],
                "status": status,
                "total_ms": round((time.perf_counter() - started) * 1000, 1),
                **state.get("log", {}),
            }
            if scope["path"] not in ("/health", "/ping", "/metrics"):
                access_logger.info("request", extra={"fields": fields})
