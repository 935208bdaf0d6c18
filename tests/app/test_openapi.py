"""`/openapi.json` describes what the server does: generated clients and fuzzers (schemathesis) read it."""

from __future__ import annotations

import json

import httpx
import pytest
from asgi_lifespan import LifespanManager

from backend.app import create_app
from backend.engines.fake import FakeEngine
from tests.conftest import make_settings


async def fetch_openapi(tmp_path, **settings) -> dict:
    app = create_app(make_settings(tmp_path, **settings), FakeEngine())
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            headers = {"Authorization": "Bearer k1"} if settings.get("api_key") else {}
            response = await client.get("/openapi.json", headers=headers)
    assert response.status_code == 200
    return response.json()


async def test_no_422_and_bounds_in_json_schema_terms(tmp_path):
    spec = await fetch_openapi(tmp_path)
    text = json.dumps(spec)
    assert '"422"' not in text and "HTTPValidationError" not in text  # validation failures are 400 envelopes
    assert '"ge"' not in text and '"le"' not in text and '"gt"' not in text  # pydantic's names, not JSON Schema's
    request = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"type": "number", "minimum": 0, "maximum": 2} in request["temperature"]["anyOf"]
    assert {"type": "number", "exclusiveMinimum": 0, "maximum": 1} in request["top_p"]["anyOf"]


async def test_every_error_the_server_sends_is_documented_as_the_envelope(tmp_path):
    spec = await fetch_openapi(tmp_path)
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert sorted(chat) == ["200", "400", "404", "408", "413", "429", "503", "504"]  # no 401 without keys
    for status in ("400", "429", "504"):
        assert chat[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "Retry-After" in chat["429"]["headers"]
    vision = spec["paths"]["/v1/vision/analyze"]["post"]
    assert "415" in vision["responses"]
    assert vision["requestBody"]["content"]["application/json"]["schema"]["required"] == ["image"]
    assert vision["requestBody"]["content"]["multipart/form-data"]["schema"]["required"] == ["image"]
    assert "securitySchemes" not in spec["components"]


@pytest.mark.parametrize("path", ["/health", "/ping", "/metrics"])
async def test_with_keys_the_bearer_scheme_guards_all_but_the_open_paths(tmp_path, path):
    spec = await fetch_openapi(tmp_path, api_key="k1")
    assert spec["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "one of the keys in API_KEY",
    }
    assert spec["paths"][path]["get"]["security"] == []
    for guarded, method in [("/v1/chat/completions", "post"), ("/v1/models", "get"), ("/v1/vision/analyze", "post")]:
        operation = spec["paths"][guarded][method]
        assert operation["security"] == [{"apiKey": []}] and "401" in operation["responses"]
