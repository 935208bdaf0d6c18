"""Scheduling over HTTP: concurrent requests share a batch, a full queue is 429 with Retry-After, and a
request past REQUEST_TIMEOUT is 504 (its generation stopped).

Each test has an app of its own (the scheduler's peak and counters start at zero), and waits for the
scheduler's state or holds the model at a gate instead of sleeping.
"""

import asyncio
import time

import pytest

from tests.helpers import Gate, LmHeadHook, parse_sse, wait_for

URL = "/v1/chat/completions"


def chat(max_tokens, **extra):
    return {"messages": [{"role": "user", "content": "你好"}], "max_tokens": max_tokens, "temperature": 0, **extra}


async def test_concurrent_requests_are_batched_and_answered_like_lone_ones(app_client):
    app, client = await app_client()
    scheduler = app.state.engine.scheduler
    alone = (await client.post(URL, json=chat(12))).json()["choices"][0]["message"]["content"]
    assert (await client.get("/health")).json()["scheduler"]["peak_running"] == 1
    # The first request's prefill waits at a gate until the seven others are queued, so all eight must share
    # the batch (without it, how many overlap depends on how fast each request is prepared).
    gate = Gate()

    def hold_the_first_prefill(call, logits):
        if call == 0:
            gate.stop_here()
        return logits

    with LmHeadHook(app.state.engine.loaded.model, hold_the_first_prefill):
        first = asyncio.ensure_future(client.post(URL, json=chat(12)))
        await gate.wait_reached()
        others = [asyncio.ensure_future(client.post(URL, json=chat(12))) for _ in range(7)]
        await wait_for(lambda: scheduler.waiting == 7, what="seven queued requests")
        gate.open()
        answers = await asyncio.gather(first, *others)
    assert [a.json()["choices"][0]["message"]["content"] for a in answers] == [alone] * 8
    # The last answers may arrive a moment before their rows leave the batch.
    await wait_for(lambda: scheduler.running == 0, what="the batch to empty")
    health = (await client.get("/health")).json()["scheduler"]
    assert health["peak_running"] == 8 and health["running"] == 0 and health["waiting"] == 0
    await client.aclose()


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
    stats = app.state.engine.stats
    assert stats.finished["abort"] == 0
    busy.cancel()  # the client leaves: its generation is aborted, and the queued request runs
    assert (await queued).status_code == 200
    # The queued request would get its 200 even if the busy one ran to its 4000 tokens: the proof of the
    # abort is the counter, and how far the aborted generation got.
    assert stats.finished["abort"] == 1
    assert 0 < stats.last_aborted_tokens < 4000
    await client.aclose()


async def test_a_request_past_its_timeout_is_504_and_stops(app_client):
    app, client = await app_client(request_timeout_seconds=30)
    engine = app.state.engine
    limits = []

    def deadline_passes_at_the_fourth_token(call, logits):
        # Instead of a short REQUEST_TIMEOUT that a slow machine may reach before the first token (or a fast
        # one after the last), the deadline REQUEST_TIMEOUT set is moved to "now" once four tokens exist.
        for row in engine.scheduler.batch.rows:
            if len(row.output_ids) == 4:
                limits.append(row.job.deadline - row.job.submitted_at)
                row.job.deadline = time.perf_counter()
        return logits

    with LmHeadHook(engine.loaded.model, deadline_passes_at_the_fourth_token):
        response = await client.post(URL, json=chat(8000, ignore_eos=True))
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "request_timeout"
        streamed = parse_sse((await client.post(URL, json=chat(8000, ignore_eos=True, stream=True))).text)
    assert limits == [pytest.approx(30), pytest.approx(30)]  # the deadlines came from REQUEST_TIMEOUT_SECONDS
    assert streamed[-2]["error"]["code"] == "request_timeout" and streamed[-1] == "[DONE]"
    content_chunks = [
        e for e in streamed if isinstance(e, dict) and "choices" in e and e["choices"][0]["delta"].get("content")
    ]
    assert 0 < len(content_chunks) <= 5  # stopped at the deadline, not at max_tokens
    await wait_for(lambda: engine.scheduler.running == 0, what="the batch to empty")
    stats = (await client.get("/health")).json()
    assert stats["generation"]["failed"] == 2 and stats["generation"]["finished"]["length"] == 0
    await client.aclose()
