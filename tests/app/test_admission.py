"""Admission over HTTP: a full queue is a real 429 for streams too, the n choices of a request are queued
all or none, a dead inference thread is a 503 and an `error` health, and odd text is a clean 400."""

import asyncio
import contextlib
import json
import logging

import pytest

from backend.engines.transformers_engine.scheduler import Scheduler
from tests.helpers import Gate, LmHeadHook, wait_for

CHAT = "/v1/chat/completions"


def chat(max_tokens=2, **extra):
    return {"messages": [{"role": "user", "content": "你好"}], "max_tokens": max_tokens, "temperature": 0, **extra}


@contextlib.asynccontextmanager
async def one_running_one_waiting(client, engine):
    """A request held inside the model (50 tokens) and one queued behind it (3 tokens), as tasks; the
    yielded gate lets them go on."""
    gate = Gate()

    def hold_at_the_first_decode_step(call, logits):
        if call == 1:
            gate.stop_here()
        return logits

    with LmHeadHook(engine.loaded.model, hold_at_the_first_decode_step):
        running = asyncio.ensure_future(client.post(CHAT, json=chat(50, ignore_eos=True)))
        await gate.wait_reached()
        waiting = asyncio.ensure_future(client.post(CHAT, json=chat(3)))
        await wait_for(lambda: engine.scheduler.waiting == 1)
        yield running, waiting, gate


async def test_a_full_queue_is_a_429_for_streams_and_for_n_choices_and_nothing_is_left_running(app_client):
    app, client = await app_client(max_batch_size=1, max_queue=2)
    engine = app.state.engine
    async with one_running_one_waiting(client, engine) as (busy, queued, gate):
        tokens_before = engine.stats.generated_tokens

        streamed = await client.post(CHAT, json=chat(3, stream=True, n=2))
        assert streamed.status_code == 429 and streamed.headers["retry-after"]
        assert streamed.json()["error"]["code"] == "queue_full"  # an envelope, not a 200 and a broken stream
        several = await client.post(CHAT, json=chat(300, n=2, ignore_eos=True))
        assert several.status_code == 429
        assert engine.scheduler.waiting == 1  # neither request left a choice in the queue

        gate.open()
        assert (await busy).status_code == 200 and (await queued).status_code == 200
    await wait_for(lambda: engine.scheduler.running == 0)
    # Only the two admitted requests generated: 50 + 3 tokens, none for the refused choices.
    assert engine.stats.generated_tokens - tokens_before <= 53


async def test_a_dead_inference_thread_is_503_everywhere(app_client, monkeypatch):
    app, client = await app_client(max_batch_size=1)
    engine = app.state.engine
    async with one_running_one_waiting(client, engine) as (running, waiting, gate):

        def die(self):
            raise SystemExit("killed")

        monkeypatch.setattr(Scheduler, "step", die)
        gate.open()
        for request in (running, waiting):
            response = await asyncio.wait_for(request, 30)
            assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead"
    health = await client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "error"
    assert "inference thread stopped" in health.json()["error"]
    ping = await client.get("/ping")
    assert ping.status_code == 503 and ping.json()["error"]["code"] == "engine_dead"
    later = await asyncio.wait_for(client.post(CHAT, json=chat(3)), 10)
    assert later.status_code == 503 and later.json()["error"]["code"] == "engine_dead"


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
        (b'{"model": "\\udfff", "messages": [{"role": "user", "content": "a"}]}', "model"),
        (
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
            "messages[0].content[0].text",
        ),
    ],
)
async def test_a_lone_surrogate_is_a_400_naming_the_field(client, raw, param):
    response = await client.post(CHAT, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": response.json()["error"]["message"],
        "type": "invalid_request_error",
        "param": param,
        "code": "invalid_unicode",
    }
    paired = b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "max_tokens": 1}'
    assert (await client.post(CHAT, content=paired, headers={"Content-Type": "application/json"})).status_code == 200


async def test_deeply_nested_values_are_a_400(client):
    deep = b'{"messages": [{"role": "user", "content": "a"}], "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    response = await client.post(CHAT, content=deep, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    fields = {"temperature": "[" * 5000}
    files = {"image": ("t.png", b"\x89PNG", "image/png")}
    response = await client.post("/v1/vision/analyze", data=fields, files=files)
    assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"


async def call_and_hang_up(app, body: bytes, after: float) -> list[dict]:
    """Call the app as a client that sends `body` and closes the connection `after` seconds later; the
    messages the app sent back."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": CHAT,
        "raw_path": CHAT.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    incoming = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive():
        if incoming:
            return incoming.pop()
        await asyncio.sleep(after)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def test_a_client_that_leaves_while_its_request_is_prepared_is_a_499_not_a_500(app_client, caplog):
    """The audit's hang-up: the client leaves while its image is still being fetched."""
    stalled = asyncio.Event()

    async def stall(reader, writer):  # an image server that never answers
        stalled.set()
        await asyncio.sleep(60)

    server = await asyncio.start_server(stall, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    app, _ = await app_client(image_url_allowed_domains="localhost", image_url_allow_private_networks=True)
    url = f"http://localhost:{port}/tongue.png"
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    async with server:
        sent = await asyncio.wait_for(call_and_hang_up(app, json.dumps(body).encode(), after=0.2), 30)
    assert stalled.is_set()  # the client left during the fetch, not before it
    assert sent[0]["status"] == 499
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
