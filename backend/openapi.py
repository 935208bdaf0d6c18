"""The OpenAPI document at `/openapi.json`, made to describe what the server really does.

FastAPI's defaults mislead generated clients and fuzzers: every route with a body documents a 422 that this
server never sends (validation failures are 400 envelopes, errors.py), the failures it does send (401, 408,
413, 429, 503, 504) are missing, and nothing says that an API key is needed when keys are set. This module
writes the error responses once for every route, removes the 422s, and adds the bearer scheme when API_KEY is
set (the open paths, such as /health and /ping, stay open).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from backend.middleware import OPEN_PATHS, OPEN_PREFIXES

ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorResponse"}
# What each status means here; every one is sent as the OpenAI error envelope.
ERROR_STATUSES = {
    "400": "Invalid request: a field, an image, or the context length (`error.param` names the field)",
    "401": "Missing or wrong API key (when API_KEY is set)",
    "404": "Unknown model (`code: model_not_found`) or route",
    "408": "The request body arrived too slowly (BODY_READ_TIMEOUT_SECONDS)",
    "413": "The body or an image is over a size limit",
    "415": "The body is neither JSON nor a multipart form",
    "429": "The queue is full (MAX_QUEUE); retry after `Retry-After` seconds",
    "503": "The model is loading, failed to load, or its engine stopped (`error.code` says which)",
    "504": "The request ran past REQUEST_TIMEOUT_SECONDS and was stopped",
}
# Which of them each kind of route can answer (beyond what the route documents itself).
GENERATION_ERRORS = ("400", "401", "404", "408", "413", "429", "503", "504")
READ_ERRORS = ("401",)


def install_openapi(app: FastAPI, api_keys_set: bool) -> None:
    """Replace `app.openapi` with the corrected document (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            app.openapi_schema = describe(schema, api_keys_set)
        return app.openapi_schema

    app.openapi = openapi


def describe(schema: dict[str, Any], api_keys_set: bool) -> dict[str, Any]:
    """The document with our error responses, without FastAPI's 422, and with the key scheme if keys are set."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    if api_keys_set:
        components["securitySchemes"] = {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "one of the keys in API_KEY"}
        }
    for path, operations in schema.get("paths", {}).items():
        open_path = path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            wanted = GENERATION_ERRORS if method == "post" else () if open_path else READ_ERRORS
            for status in wanted:
                if status == "401" and not api_keys_set:
                    continue
                responses.setdefault(status, {})
            for status, response in responses.items():
                if status in ERROR_STATUSES and not _has_content(response):
                    response["description"] = ERROR_STATUSES[status]
                    response["content"] = {"application/json": {"schema": ERROR_SCHEMA}}
                elif status in ERROR_STATUSES:
                    response["description"] = ERROR_STATUSES[status]
            if "429" in responses:
                responses["429"]["headers"] = {
                    "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}
                }
            if api_keys_set:
                operation["security"] = [] if open_path else [{"apiKey": []}]
    return schema


def _has_content(response: dict[str, Any]) -> bool:
    return bool(response.get("content"))
