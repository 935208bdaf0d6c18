"""Scheduling over HTTP: concurrent requests share a batch, a full queue is 429 with Retry-After, and a
request past REQUEST_TIMEOUT is 504 (its generation stopped)."""

import asyncio

import httpx
import pytest
from asgi_lifespan import LifespanManager

from backend.app import create_app
from tests.conftest import make_settings
from tests.helpers import parse_sse

URL = "/v1/chat/completions"


def chat(max_tokens, **extra):
    return {"messages": [{"role": "user", "content": "你好"}], "max_tokens": max_tokens, "temperature": 0, **extra}


@pytest.fixture
async def app_client(tiny_vl_dir):
    managers = []

    async def make(**overrides):
        app = create_app(make_settings(tiny_vl_dir, **overrides))
        manager = LifespanManager(app, startup_timeout=60)
        await manager.__aenter__()
        managers.append(manager)
        await app.state.engine.wait_until_loaded()
        transport = httpx.ASGITransport(app=app)
        return app, httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120)

    yield make
    for manager in managers:
        await manager.__aexit__(None, None, None)


async def test_concurrent_requests_are_batched_and_answered_like_lone_ones(client):
    alone = (await client.post(URL, json=chat(12))).json()["choices"][0]["message"]["content"]
    answers = await asyncio.gather(*(client.post(URL, json=chat(12)) for _ in range(8)))
    assert [a.json()["choices"][0]["message"]["content"] for a in answers] == [alone] * 8
    for _ in range(200):  # the last answers may arrive a moment before their rows leave the batch
        scheduler = (await client.get("/health")).json()["scheduler"]
        if scheduler["running"] == 0:
            break
        await asyncio.sleep(0.01)
    assert scheduler["peak_running"] > 1 and scheduler["running"] == 0 and scheduler["waiting"] == 0


async def test_a_full_queue_answers_429_with_retry_after(app_client):
    app, client = await app_client(max_batch_size=1, max_queue=1)
    scheduler = app.state.engine.scheduler
    busy = asyncio.ensure_future(client.post(URL, json=chat(4000, ignore_eos=True)))
    while scheduler.running == 0:
        await asyncio.sleep(0.01)
    queued = asyncio.ensure_future(client.post(URL, json=chat(2)))
    while scheduler.waiting == 0:
        await asyncio.sleep(0.01)
    refused = await client.post(URL, json=chat(2))
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "queue_full" and refused.json()["error"]["type"] == "rate_limit_error"
    busy.cancel()  # the client leaves: its generation is aborted, and the queued request runs
    assert (await queued).status_code == 200
    await client.aclose()


async def test_a_request_past_its_timeout_is_504_and_stops(app_client):
    app, client = await app_client(request_timeout_seconds=0.5)
    response = await client.post(URL, json=chat(8000, ignore_eos=True))
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "request_timeout"
    streamed = parse_sse((await client.post(URL, json=chat(8000, ignore_eos=True, stream=True))).text)
    assert streamed[-2]["error"]["code"] == "request_timeout" and streamed[-1] == "[DONE]"
    content_chunks = [
        e for e in streamed if isinstance(e, dict) and "choices" in e and e["choices"][0]["delta"].get("content")
    ]
    assert 0 < len(content_chunks) < 8000  # stopped at the deadline, not at max_tokens
    stats = (await client.get("/health")).json()
    assert stats["generation"]["failed"] == 2 and stats["scheduler"]["running"] == 0
    await client.aclose()
