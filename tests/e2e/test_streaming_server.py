"""Streaming end to end: the `openai` client's sync and async iterators, and disconnect = abort."""

import asyncio
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import hold_request
from tests.helpers import parse_sse

MESSAGES = [{"role": "user", "content": "舌苔薄白，舌质淡红，请分析。"}]


@pytest.fixture(scope="module")
def client(server_url):
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)


def test_sync_streaming_iterator(client):
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == "length"
    assert usage.completion_tokens == 12 and usage.prompt_tokens == whole.usage.prompt_tokens


async def test_async_streaming_iterator(server_url):
    client = openai.AsyncOpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)
    stream = await client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    await client.close()


def generation_stats(server_url):
    return httpx.get(f"{server_url}/health", timeout=10).json()["generation"]


def scheduler_state(server_url):
    return httpx.get(f"{server_url}/health", timeout=10).json()["scheduler"]


def wait_for_abort(server_url, aborted_before, deadline_seconds=60):
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        stats = generation_stats(server_url)
        if stats["finished"]["abort"] > aborted_before:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"the abandoned generation was not aborted: {stats}")


MAX_TOKENS = 8000  # far more than the tiny model makes in the time the test takes to hang up


def test_a_disconnected_stream_stops_its_generation(server_url):
    before = generation_stats(server_url)["finished"]["abort"]
    body = {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server_url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
    assert received[0].startswith("data: ")
    stats = wait_for_abort(server_url, before)
    assert stats["finished"]["abort"] == before + 1
    assert 0 < stats["last_aborted_tokens"] < MAX_TOKENS
    # The server is free again: the next request is answered at once, not after 8000 tokens.
    after = httpx.post(f"{server_url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}, timeout=60)
    assert after.status_code == 200


def test_a_disconnected_non_streaming_request_stops_its_generation(server_url):
    before = generation_stats(server_url)["finished"]["abort"]
    steps_before = scheduler_state(server_url)["decode_steps"]
    body = {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "ignore_eos": True}
    # A raw connection, closed once the server reports the generation running and producing tokens: a client
    # read timeout instead would guess how long the queue and the prefill take.
    with hold_request(server_url, "/v1/chat/completions", body):
        deadline = time.monotonic() + 60
        while True:
            scheduler = scheduler_state(server_url)
            if scheduler["running"] == 1 and scheduler["decode_steps"] >= steps_before + 3:
                break
            assert time.monotonic() < deadline, f"the generation did not start: {scheduler}"
            time.sleep(0.02)
    stats = wait_for_abort(server_url, before)
    assert stats["finished"]["abort"] == before + 1
    assert 0 < stats["last_aborted_tokens"] < MAX_TOKENS


async def test_many_concurrent_streams_all_complete(server_url):
    async with httpx.AsyncClient(base_url=server_url, timeout=120) as http:

        async def one(index):
            body = {"messages": MESSAGES, "max_tokens": 5, "ignore_eos": True, "stream": True, "seed": index}
            response = await http.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            return parse_sse(response.text)

        streams = await asyncio.gather(*(one(index) for index in range(8)))
    for events in streams:
        # `[DONE]` also ends a stream that failed (after its error event): completion is the finish_reason.
        assert events[-1] == "[DONE]"
        assert not [event for event in events if isinstance(event, dict) and "error" in event], events
        chunks = [event for event in events if isinstance(event, dict)]
        finishes = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")]
        assert finishes == ["length"]
