"""`/health`, `/ping` and `/v1/models` through the model's life: loading, ready, failed; and CORS."""

import threading

import httpx
from asgi_lifespan import LifespanManager

from backend.app import create_app
from backend.engines.transformers_engine.engine import TransformersEngine
from backend.engines.transformers_engine.loader import load_model
from tests.conftest import make_settings


async def test_ready_health_reports_the_model_and_its_memory(client):
    response = await client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready" and body["error"] is None
    assert body["served_model_name"] == "tiny"
    assert body["dtype"] == "float32" and body["device"] == "cpu"
    assert body["accepts_images"] is True
    assert 100_000 < body["parameters"] < 10_000_000
    assert body["memory"]["process_rss_bytes"] > 0
    assert body["load_seconds"] > 0 and body["uptime_seconds"] > 0
    assert body["max_model_len"] == 32768


async def test_ping_is_200_when_ready(client):
    assert (await client.get("/ping")).status_code == 200


async def test_models_list_and_retrieve(client, vl_settings):
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == "tiny" and card["object"] == "model" and card["max_model_len"] == 32768
    assert card["root"] == vl_settings.model_id
    assert (await client.get("/v1/models/tiny")).json()["id"] == "tiny"
    missing = await client.get("/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


async def test_openapi_docs_are_served(client):
    assert (await client.get("/docs")).status_code == 200
    schema = (await client.get("/openapi.json")).json()
    assert "/v1/chat/completions" in schema["paths"]


async def serve(app):
    manager = LifespanManager(app, startup_timeout=60, shutdown_timeout=60)
    await manager.__aenter__()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://localhost")
    return manager, client


async def test_while_loading_health_is_503_ping_is_204_and_chat_is_503(tiny_vl_dir):
    settings = make_settings(tiny_vl_dir)
    release = threading.Event()

    def slow_loader(s):
        release.wait(30)
        return load_model(s)

    app = create_app(settings, TransformersEngine(settings, loader=slow_loader))
    manager, client = await serve(app)
    try:
        health = await client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        assert (await client.get("/ping")).status_code == 204
        chat = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 503 and chat.json()["error"]["code"] == "model_loading"
        release.set()
        await app.state.engine.wait_until_loaded()
        assert (await client.get("/health")).status_code == 200
    finally:
        release.set()
        await client.aclose()
        await manager.__aexit__(None, None, None)


async def test_a_failed_load_is_reported_not_hidden(tmp_path):
    settings = make_settings(tmp_path / "no-such-model")
    app = create_app(settings)
    manager, client = await serve(app)
    try:
        await app.state.engine.wait_until_loaded()
        health = await client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "error" and "no-such-model" in health.json()["error"]
        ping = await client.get("/ping")
        assert ping.status_code == 503 and ping.json()["error"]["code"] == "model_load_failed"
        chat = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 503 and "no-such-model" in chat.json()["error"]["message"]
    finally:
        await client.aclose()
        await manager.__aexit__(None, None, None)


async def test_text_only_model_serves_text_and_refuses_images(tiny_text_dir):
    from tests.conftest import data_uri

    app = create_app(make_settings(tiny_text_dir))
    manager, client = await serve(app)
    try:
        await app.state.engine.wait_until_loaded()
        assert (await client.get("/health")).json()["accepts_images"] is False
        text = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 3, "temperature": 0}
        assert (await client.post("/v1/chat/completions", json=text)).json()["usage"]["completion_tokens"] == 3
        image = {"type": "image_url", "image_url": {"url": data_uri()}}
        response = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [image]}]})
        assert response.status_code == 400 and response.json()["error"]["code"] == "images_not_supported"
    finally:
        await client.aclose()
        await manager.__aexit__(None, None, None)
