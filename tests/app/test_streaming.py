"""Streaming over ASGI, read with a hand-written SSE parser: chunk format, usage, Chinese split over byte
tokens, stop strings across chunks, keep-alives while waiting, and errors after the stream started."""

import asyncio
import logging
import time

import httpx
import pytest
import torch
from asgi_lifespan import LifespanManager

from backend.app import create_app
from tests.conftest import data_uri, make_settings
from tests.helpers import LmHeadHook, forcing, parse_sse, wait_until_idle

URL = "/v1/chat/completions"


def chat(content="你好", **extra):
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}


async def stream(client, body):
    response = await client.post(URL, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return parse_sse(response.text)


def chunks(events):
    return [event for event in events if isinstance(event, dict)]


def content_of(events):
    return "".join(choice["delta"].get("content", "") for chunk in chunks(events) for choice in chunk.get("choices", []))


async def test_chunks_follow_the_openai_format(client):
    events = await stream(client, chat(max_tokens=6))
    assert events[-1] == "[DONE]"
    data = chunks(events)
    assert all(chunk["object"] == "chat.completion.chunk" and chunk["model"] == "tiny" for chunk in data)
    assert len({chunk["id"] for chunk in data}) == 1 and data[0]["id"].startswith("chatcmpl-")
    assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [chunk["choices"][0].get("finish_reason") for chunk in data] == [None] * (len(data) - 1) + ["length"]
    assert all("usage" not in chunk for chunk in data)


async def test_streamed_text_equals_the_non_streamed_answer(client):
    whole = (await client.post(URL, json=chat(max_tokens=20))).json()
    events = await stream(client, chat(max_tokens=20))
    assert content_of(events) == whole["choices"][0]["message"]["content"]


async def test_include_usage_adds_a_final_usage_chunk(client):
    whole = (await client.post(URL, json=chat(max_tokens=9))).json()
    events = await stream(client, chat(max_tokens=9, stream_options={"include_usage": True}))
    usage_chunk = chunks(events)[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    assert chunks(events)[-2]["choices"][0]["finish_reason"] == "length"
    no_usage = await stream(client, chat(max_tokens=9, stream_options={"include_usage": False}))
    assert all("usage" not in chunk for chunk in chunks(no_usage))


async def test_image_request_streams(client):
    content = [{"type": "image_url", "image_url": {"url": data_uri(100, 100)}}, {"type": "text", "text": "看舌"}]
    events = await stream(client, chat(content, max_tokens=4, stream_options={"include_usage": True}))
    assert chunks(events)[-1]["usage"]["completion_tokens"] == 4


async def test_n_choices_stream_with_their_indexes(client):
    events = await stream(client, chat(max_tokens=3, n=2, seed=5, temperature=1.0))
    finishes = [
        (c["index"], c["finish_reason"]) for chunk in chunks(events) for c in chunk["choices"] if c.get("finish_reason")
    ]
    assert finishes == [(0, "length"), (1, "length")]


@pytest.fixture(scope="module")
def tongue_text_tokens(tiny_vl_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_vl_dir)
    # 龘 and 𪚥 are not in the tiny vocabulary: each is spelled with 3-4 byte tokens.
    text = "舌质淡红龘，苔薄白𪚥。"
    return text, tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.convert_tokens_to_ids("<|im_end|>")


async def test_chinese_split_over_byte_tokens_arrives_whole(client, tongue_text_tokens):
    text, token_ids, end = tongue_text_tokens
    model = client._transport.app.state.engine.loaded.model
    await wait_until_idle(client._transport.app.state.engine)  # the hook's calls are this request's alone
    with LmHeadHook(model, forcing(token_ids, end)):
        events = await stream(client, chat(max_tokens=50))
    pieces = [c["delta"]["content"] for chunk in chunks(events) for c in chunk["choices"] if c["delta"].get("content")]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert len(pieces) < len(token_ids)  # byte tokens were held until their character was complete
    assert chunks(events)[-1]["choices"][0]["finish_reason"] == "stop"


async def test_stop_string_across_chunks_is_not_emitted(client, tongue_text_tokens):
    text, token_ids, end = tongue_text_tokens
    model = client._transport.app.state.engine.loaded.model
    await wait_until_idle(client._transport.app.state.engine)  # the hook's calls are this request's alone
    with LmHeadHook(model, forcing(token_ids, end)):
        events = await stream(client, chat(max_tokens=50, stop=["红龘，苔"]))
    assert content_of(events) == "舌质淡"
    assert chunks(events)[-1]["choices"][0]["finish_reason"] == "stop"


async def test_an_error_after_the_stream_started_is_an_error_event_then_done(client):
    model = client._transport.app.state.engine.loaded.model

    def nan_after_three(call, logits):
        return torch.full_like(logits, float("nan")) if call >= 3 else logits

    await wait_until_idle(client._transport.app.state.engine)  # the hook's calls are this request's alone
    with LmHeadHook(model, nan_after_three):
        events = await stream(client, chat(max_tokens=20, ignore_eos=True))
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "non_finite_logits" and error["type"] == "server_error"
    assert len([chunk for chunk in chunks(events) if "choices" in chunk]) >= 2  # role + content came first
    healthy = await stream(client, chat(max_tokens=2))
    assert chunks(healthy)[-1]["choices"][0]["finish_reason"] == "length"


async def test_text_that_arrives_together_with_an_error_is_delivered_before_it(client):
    """The inference thread can post tokens and the failure faster than the event loop reads them; the text
    generated before the failure must still reach the client, ahead of the error event."""
    engine = client._transport.app.state.engine
    model = engine.loaded.model
    loop = asyncio.get_running_loop()
    expected = content_of(await stream(client, chat(max_tokens=3, ignore_eos=True)))
    assert expected  # three greedy tokens of the tiny model make visible text
    await wait_until_idle(engine)
    failed_before = engine.stats.failed
    held = []

    def hold_the_loop_until_the_failure_is_posted():
        # Runs on the event loop and blocks it until the inference thread has made its three tokens and
        # failed, and the failed row has left the batch (its Failed event is posted by then): every event
        # of the request then reaches the handler in one batch, whatever the speed of either thread.
        deadline = time.monotonic() + 30
        while not (engine.stats.failed > failed_before and engine.scheduler.running == 0):
            assert time.monotonic() < deadline, "the inference thread did not fail the request"
            time.sleep(0.001)
        held.append(True)

    def hold_the_loop_then_nan(call, logits):
        if call == 0:
            loop.call_soon_threadsafe(hold_the_loop_until_the_failure_is_posted)
        return torch.full_like(logits, float("nan")) if call >= 3 else logits

    with LmHeadHook(model, hold_the_loop_then_nan):
        events = await stream(client, chat(max_tokens=20, ignore_eos=True))
    assert held == [True]  # the loop was held (an assertion inside a loop callback would only be logged)
    assert events[-2]["error"]["code"] == "non_finite_logits" and events[-1] == "[DONE]"
    assert content_of(events) == expected


async def test_bad_input_is_still_a_plain_400_when_streaming(client):
    response = await client.post(URL, json={**chat(max_tokens=-1), "stream": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"


async def test_time_to_first_token_is_logged(client, caplog):
    with caplog.at_level(logging.INFO, logger="backend.access"):
        await stream(client, chat(max_tokens=2))
    [line] = [record.fields for record in caplog.records if record.name == "backend.access"]
    assert line["finish_reason"] == "length" and line["completion_tokens"] == 2 and line["ttft_ms"] > 0


async def test_keepalives_are_sent_while_a_request_waits_in_the_queue(tiny_vl_dir):
    # A batch of one makes the second request wait in the queue behind the first.
    app = create_app(make_settings(tiny_vl_dir, stream_keepalive_seconds=0.05, max_batch_size=1))
    async with LifespanManager(app, startup_timeout=60):
        await app.state.engine.wait_until_loaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=120) as http:
            busy = asyncio.ensure_future(http.post(URL, json=chat(max_tokens=3000, ignore_eos=True)))
            while app.state.engine.scheduler.running == 0:
                await asyncio.sleep(0.01)
            waiting = await stream(http, chat(max_tokens=3))
            await busy
    first_content = next(
        i
        for i, e in enumerate(waiting)
        if isinstance(e, dict) and e["choices"][0]["delta"].get("content") is not None and i > 0
    )
    keepalives = [i for i, event in enumerate(waiting) if event == ": keep-alive"]
    assert waiting[0]["choices"][0]["delta"]["role"] == "assistant"  # headers and role went out at once
    assert keepalives and keepalives[0] < first_content
