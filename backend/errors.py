"""Every failure the API reports, and the one place that maps them to the OpenAI error envelope.

Handlers and engines raise an `APIError` subclass (plain exceptions: this module imports FastAPI only inside
`install_error_handlers`); `install_error_handlers` turns it, FastAPI's validation errors,
Starlette's HTTP errors (unknown routes, wrong methods) and unexpected exceptions into
`{"error": {"message", "type", "param", "code"}}` with a fitting status. A 500 means a bug in this server.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the engines raise these classes without importing the web framework
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

logger = logging.getLogger(__name__)


class APIError(Exception):
    """Base of every error answered to a client; subclasses fix the status and the OpenAI error type."""

    status_code = 500
    error_type = "server_error"
    headers: dict[str, str] | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        """The body of the envelope, also used for error events inside a stream."""
        return {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}


class InvalidRequestError(APIError):
    """The request is malformed or asks for something this server cannot do (400)."""

    status_code = 400
    error_type = "invalid_request_error"


class InvalidImageError(InvalidRequestError):
    """An image could not be read, or is outside the allowed sizes (400)."""


class ImageTooLargeError(APIError):
    """An image is over a byte or pixel limit (413)."""

    status_code = 413
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param, code="image_too_large")


class RequestTooLargeError(APIError):
    """The request body is over MAX_REQUEST_BYTES (413)."""

    status_code = 413
    error_type = "invalid_request_error"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"The request body is larger than the limit of {limit} bytes (MAX_REQUEST_BYTES).",
            code="request_too_large",
        )


class BodyReadTimeoutError(APIError):
    """The client sent its body too slowly (408): slow-loris protection."""

    status_code = 408
    error_type = "invalid_request_error"


class ClientDisconnected(APIError):
    """The client went away before the answer was ready; its work was cancelled. Answered 499 (nginx's
    "client closed request"), which nobody reads but the log line records."""

    status_code = 499
    error_type = "client_closed_request"

    def __init__(self) -> None:
        super().__init__("The client closed the connection before the answer was ready.", code="client_closed")


class UnsupportedMediaTypeError(APIError):
    """The body is neither JSON nor a multipart form (415)."""

    status_code = 415
    error_type = "invalid_request_error"


class ModelNotFoundError(APIError):
    """The request names a model this server does not serve (404)."""

    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, requested: str, served: str) -> None:
        super().__init__(
            f"The model `{requested}` does not exist. This server serves `{served}`.",
            param="model",
            code="model_not_found",
        )


class ModelNotReadyError(APIError):
    """The model is still loading, or failed to load (503)."""

    status_code = 503
    error_type = "service_unavailable"


class ModelLoadError(ModelNotReadyError):
    """The checkpoint could not be found or loaded; the message says what to do (503 until restarted)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="model_load_failed")


class OutOfMemoryError(APIError):
    """The accelerator ran out of memory on this request; the server freed its cache and goes on (503)."""

    status_code = 503
    error_type = "service_unavailable"


class QueueFullError(APIError):
    """More requests wait than MAX_QUEUE allows (429, with Retry-After)."""

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, limit: int, retry_after_seconds: int) -> None:
        super().__init__(
            f"The server is busy: {limit} requests are already waiting (MAX_QUEUE). Retry in a few seconds.",
            code="queue_full",
        )
        self.headers = {"Retry-After": str(retry_after_seconds)}


class RequestTimeoutError(APIError):
    """The request ran past REQUEST_TIMEOUT; its generation was stopped (504)."""

    status_code = 504
    error_type = "timeout_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="request_timeout")

    @classmethod
    def after(cls, limit_seconds: float) -> RequestTimeoutError:
        """The error every engine raises for a generation stopped at its deadline."""
        return cls(f"The request took longer than {limit_seconds:g} s (REQUEST_TIMEOUT) and was stopped.")


class ModelOutputError(APIError):
    """The model produced non-finite logits (float16 overflow): the answer would be garbage (500)."""

    status_code = 500
    error_type = "server_error"


def error_body(message: str, error_type: str, param: str | None = None, code: Any = None) -> dict:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _json_error(status_code: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status_code, content=body, headers=headers)


# Pydantic names the member of a union it tried (`str`, `list[...]`, `function-after[...]`) inside `loc`;
# clients want the field, not our types.
_UNION_MEMBER_NAMES = {"str", "int", "float", "bool", "dict", "list", "none", "json-or-python"}


def format_location(loc: tuple[Any, ...]) -> str | None:
    """`("body", "messages", 0, "content", "str")` -> `messages[0].content` (a validation error's `param`)."""
    parts = []
    tag_follows = False  # a tagged union's member is named by its tag after the item's index: dropped
    for part in loc:
        if isinstance(part, str) and "tagged-union[" in part:
            tag_follows = True
        if part in ("body", "query", "path", "header"):
            continue
        if isinstance(part, str) and (part in _UNION_MEMBER_NAMES or "[" in part):
            continue
        if tag_follows and isinstance(part, str) and parts and isinstance(parts[-1], int):
            tag_follows = False  # `content[0].image_url.image_url` -> `content[0].image_url`
            continue
        parts.append(part)
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or None


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable message for the first invalid field (all the union alternatives it failed), and the field."""
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return f"The request body is not valid JSON: {reason}".rstrip(": "), None
    param = format_location(tuple(first.get("loc", ())))
    if param is None:
        return f"The request body must be a JSON object: {first.get('msg', 'invalid')}.", None
    # A value that fits no member of a union fails once per member; the deepest failure is the telling one
    # (`content[0]` has an unknown part type, rather than `content` is not a string).
    related = [error for error in errors if (format_location(tuple(error.get("loc", ()))) or "").startswith(param)]
    deepest = max(related, key=lambda error: len(format_location(tuple(error["loc"])) or ""))
    param = format_location(tuple(deepest["loc"]))
    if deepest.get("type") == "missing":
        message = f"Missing required field `{param}`."
    else:
        message = f"Invalid value for `{param}`: {deepest.get('msg', 'invalid')}."
    others = len(errors) - len(related)
    if others:
        message += f" ({others} more problem{'s' if others > 1 else ''} in the request.)"
    return message, param


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception class to the envelope, once, for the whole app."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _json_error(exc.status_code, {"error": exc.to_dict()}, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(exc)
        return _json_error(400, error_body(message, "invalid_request_error", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"No route for {request.method} {request.url.path}."
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
        else:
            message = str(exc.detail)
        error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _json_error(exc.status_code, error_body(message, error_type), exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _json_error(500, error_body("Internal server error.", "server_error"))
