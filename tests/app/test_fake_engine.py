"""The HTTP side over the fake engine: handler logic checked in milliseconds, and proof that nothing above
the engine interface depends on which engine runs."""

import asyncio
import subprocess
import sys

import httpx
import pytest
from asgi_lifespan import LifespanManager

from backend.app import create_app
from backend.engines.fake import FakeEngine
from backend.engines.requests import ChatTurn, SamplingParams
from backend.errors import ModelNotReadyError
from backend.media.resize import PixelBounds, image_token_count, smart_resize
from tests.conftest import ROOT, make_settings
from tests.helpers import parse_sse

CHAT = "/v1/chat/completions"


@pytest.fixture
async def serve(tmp_path):
    managers = []

    async def make(engine: FakeEngine, **settings):
        app = create_app(make_settings(tmp_path, **settings), engine)
        manager = LifespanManager(app, startup_timeout=10, shutdown_timeout=10)
        await manager.__aenter__()
        managers.append(manager)
        await engine.wait_until_loaded()
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost", timeout=10)

    yield make
    for manager in managers:
        await manager.__aexit__(None, None, None)


def chat(content="你好", **extra):
    return {"messages": [{"role": "user", "content": content}], **extra}


async def test_answers_choices_usage_and_finish_reasons(serve):
    engine = FakeEngine(reply=lambda text: "舌淡苔白")
    client = await serve(engine)
    body = (await client.post(CHAT, json=chat(n=2, max_tokens=3))).json()
    assert [choice["message"]["content"] for choice in body["choices"]] == ["舌淡苔", "舌淡苔"]
    assert {choice["finish_reason"] for choice in body["choices"]} == {"length"}
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}
    whole = (await client.post(CHAT, json=chat(max_tokens=10))).json()["choices"][0]
    assert whole["message"]["content"] == "舌淡苔白" and whole["finish_reason"] == "stop"
    exact = (await client.post(CHAT, json=chat(max_tokens=4))).json()["choices"][0]
    assert exact["finish_reason"] == "length"  # the end token would have been the fifth
    stopped = (await client.post(CHAT, json=chat(max_tokens=10, stop=["苔"]))).json()["choices"][0]
    assert stopped["message"]["content"] == "舌淡" and stopped["finish_reason"] == "stop"


async def test_the_stream_format(serve):
    client = await serve(FakeEngine(reply=lambda text: "气虚"))
    response = await client.post(CHAT, json=chat(stream=True, stream_options={"include_usage": True}))
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]"
    assert "".join(event["choices"][0]["delta"].get("content", "") for event in events[:-2]) == "气虚"
    assert events[-2]["usage"]["completion_tokens"] == 2


async def test_the_engines_own_queue_limit_is_a_429_and_loading_is_a_503(serve):
    busy = await serve(FakeEngine(max_running=1, seconds_per_token=0.05))
    refused = await busy.post(CHAT, json=chat(n=2))
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
    failed = await serve(FakeEngine(load_error="no weights"))
    response = await failed.post(CHAT, json=chat())
    assert response.status_code == 503 and "no weights" in response.json()["error"]["message"]
    health = await failed.get("/health")
    assert health.status_code == 503 and health.json()["engine"] == "fake"


async def test_a_context_too_long_for_the_model_is_a_400(serve):
    client = await serve(FakeEngine(max_model_len=10))
    response = await client.post(CHAT, json=chat("一二三四五六七八九十"))
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


def test_the_http_side_imports_no_engine():
    """Importing the app, its handlers and routes loads neither torch nor transformers: they only know the
    engine interface. (Run in a fresh interpreter: this test process has imported both already.)"""
    probe = (
        "import sys, backend.app, backend.handlers.chat, backend.handlers.vision, backend.routes.health, "
        "backend.metrics; print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


async def test_cancelled_before_it_ran_is_still_an_abort_and_shutdown_refuses_new_work():
    engine = FakeEngine(max_running=1, seconds_per_token=0.01)
    await engine.start()
    await engine.wait_until_loaded()
    prompt = await engine.prepare([ChatTurn("user", ["你好"])])
    params = SamplingParams(max_new_tokens=5)
    stream = engine.generate("r", prompt, params)
    stream.cancel()  # before its task ever ran
    result = await asyncio.wait_for(stream.collect(), 5)
    assert result.finish.finish_reason == "abort" and engine.stats.finished["abort"] == 1
    again = await asyncio.wait_for(engine.generate("next", prompt, params).collect(), 5)  # the slot is free
    assert again.finish.completion_tokens == 4
    running = engine.generate("long", prompt, SamplingParams(max_new_tokens=500, ignore_eos=True))
    await asyncio.wait_for(engine.shutdown(), 5)
    assert (await running.collect()).finish.finish_reason == "abort"
    with pytest.raises(ModelNotReadyError):
        engine.generate("late", prompt, params)


async def test_warmup_runs_one_generation_with_an_image_before_ping_says_ready(tmp_path):
    """WARMUP=1: after the load, /ping stays 204 and requests get 503 `model_loading` until one short
    generation (with an image, the model reading images) has run; then 200."""
    engine = FakeEngine(reply=lambda text: "热身", seconds_per_token=0.05)
    app = create_app(make_settings(tmp_path, warmup=True), engine)
    async with LifespanManager(app, startup_timeout=10, shutdown_timeout=10):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost", timeout=10)
        await engine.wait_until_loaded()
        assert (await client.get("/ping")).status_code == 204
        refused = await client.post(CHAT, json=chat())
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_loading"
        assert (await client.get("/health")).json()["status"] == "loading"
        for _ in range(200):
            if (await client.get("/ping")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        assert (await client.get("/ping")).status_code == 200
        [warm_up] = engine.prompts
        bounds = PixelBounds(app.state.settings.min_pixels, app.state.settings.max_pixels)
        assert warm_up.image_token_counts == [image_token_count(*smart_resize(360, 420, bounds))]
        assert engine.stats.finished["length"] == 1
        assert (await client.post(CHAT, json=chat())).status_code == 200


async def test_a_failed_load_ends_the_warm_up_and_reports_the_failure(tmp_path):
    engine = FakeEngine(load_error="no weights")
    app = create_app(make_settings(tmp_path, warmup=True), engine)
    async with LifespanManager(app, startup_timeout=10, shutdown_timeout=10):
        await engine.wait_until_loaded()
        for _ in range(100):
            if not engine.warming:
                break
            await asyncio.sleep(0.01)
        assert not engine.warming and engine.state == "error" and engine.prompts == []


async def test_a_failed_warm_up_generation_still_ends_ready(tmp_path, caplog):
    """The warm-up costs the first user time if it fails, never the server its readiness."""
    engine = FakeEngine(reply=lambda text: 1 / 0)
    app = create_app(make_settings(tmp_path, warmup=True), engine)
    async with LifespanManager(app, startup_timeout=10, shutdown_timeout=10):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost", timeout=10)
        await engine.wait_until_loaded()
        for _ in range(200):
            if (await client.get("/ping")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        assert engine.state == "ready" and engine.stats.failed == 1
    assert "the warm-up generation failed" in caplog.text


async def test_shutdown_during_the_warm_up_does_not_hang(tmp_path):
    engine = FakeEngine(reply=lambda text: "慢" * 1000, seconds_per_token=0.05)
    app = create_app(make_settings(tmp_path, warmup=True), engine)
    async with LifespanManager(app, startup_timeout=10, shutdown_timeout=10):
        await engine.wait_until_loaded()
        for _ in range(100):
            if engine.prompts:
                break
            await asyncio.sleep(0.01)
        assert engine.warming
    assert engine.stats.finished["abort"] == 1 and (engine.queue_sizes() == (0, 0))
