"""A hostile-input battery against a real server with API keys and a small queue.

Every case must get its expected 4xx in the OpenAI error envelope and never a 5xx; afterwards a normal
request succeeds and the server's memory is back near where it started.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time

import httpx
import pytest

from tests import images
from tests.e2e.conftest import running_server

KEY = "sk-test-hostile-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"
OK_MESSAGE = [{"role": "user", "content": "你好"}]


@pytest.fixture(scope="module")
def server(tiny_vl_dir, tmp_path_factory):
    settings = {
        "API_KEY": f"other-key,{KEY}",
        "MAX_QUEUE": "32",
        "MAX_BATCH_SIZE": "8",
        "BODY_READ_TIMEOUT_SECONDS": "2",
        "MAX_TOKENS_LIMIT": "4096",
        "DEFAULT_MAX_TOKENS": "16",
    }
    with running_server(tiny_vl_dir, tmp_path_factory.mktemp("hostile"), **settings) as running:
        warm = httpx.post(running.url + CHAT, json={"messages": OK_MESSAGE, "max_tokens": 4}, headers=AUTH, timeout=60)
        assert warm.status_code == 200
        running.baseline_rss = rss(running)  # before the battery
        yield running


def rss(server) -> int:
    return httpx.get(f"{server.url}/health", headers=AUTH, timeout=10).json()["memory"]["process_rss_bytes"]


def body(**fields):
    return json.dumps({"messages": OK_MESSAGE, "max_tokens": 2, **fields}).encode()


def messages(*items):
    return json.dumps({"messages": list(items), "max_tokens": 2}).encode()


def image_message(url, role="user"):
    return {"role": role, "content": [{"type": "text", "text": "看"}, {"type": "image_url", "image_url": {"url": url}}]}


# (name, path, raw body, extra headers, expected status, expected param or code fragment)
CASES = [
    ("malformed json", CHAT, b'{"messages": [', {}, 400, None),
    ("json array", CHAT, b"[1, 2, 3]", {}, 400, None),
    ("empty body", CHAT, b"", {}, 400, None),
    ("json string", CHAT, b'"hello"', {}, 400, None),
    ("missing messages", CHAT, b"{}", {}, 400, "messages"),
    ("messages not a list", CHAT, b'{"messages": "hi"}', {}, 400, "messages"),
    ("empty messages", CHAT, b'{"messages": []}', {}, 400, "messages"),
    ("message without role", CHAT, messages({"content": "hi"}), {}, 400, "messages[0].role"),
    ("tool role", CHAT, messages({"role": "tool", "content": "x"}), {}, 400, "messages[0].role"),
    ("unknown role", CHAT, messages({"role": "wizard", "content": "x"}), {}, 400, "messages[0].role"),
    ("content is a number", CHAT, messages({"role": "user", "content": 42}), {}, 400, "messages[0].content"),
    (
        "unknown part type",
        CHAT,
        messages({"role": "user", "content": [{"type": "audio"}]}),
        {},
        400,
        "messages[0].content[0]",
    ),
    (
        "text part without text",
        CHAT,
        messages({"role": "user", "content": [{"type": "text"}]}),
        {},
        400,
        "messages[0].content[0]",
    ),
    (
        "image part without url",
        CHAT,
        messages({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}),
        {},
        400,
        "messages[0].content[0]",
    ),
    ("negative max_tokens", CHAT, body(max_tokens=-1), {}, 400, "max_tokens"),
    ("zero max_tokens", CHAT, body(max_tokens=0), {}, 400, "max_tokens"),
    ("float max_tokens", CHAT, body(max_tokens=5.5), {}, 400, "max_tokens"),
    ("string max_tokens", CHAT, body(max_tokens="10"), {}, 400, "max_tokens"),
    ("boolean max_tokens", CHAT, body(max_tokens=True), {}, 400, "max_tokens"),
    ("huge max_tokens", CHAT, body(max_tokens=10**12), {}, 400, "max_tokens"),
    ("negative temperature", CHAT, body(temperature=-1), {}, 400, "temperature"),
    ("temperature too high", CHAT, body(temperature=3.5), {}, 400, "temperature"),
    ("temperature a word", CHAT, body(temperature="hot"), {}, 400, "temperature"),
    ("top_p above 1", CHAT, body(top_p=1.5), {}, 400, "top_p"),
    ("top_k below -1", CHAT, body(top_k=-5), {}, 400, "top_k"),
    ("n zero", CHAT, body(n=0), {}, 400, "n"),
    ("n huge", CHAT, body(n=1000), {}, 400, "n"),
    ("17 stop strings", CHAT, body(stop=[str(i) for i in range(17)]), {}, 400, "stop"),
    ("stop not strings", CHAT, body(stop=[1, 2]), {}, 400, "stop"),
    ("float seed", CHAT, body(seed=1.5), {}, 400, "seed"),
    ("stream a word", CHAT, body(stream="yes"), {}, 400, "stream"),
    ("presence penalty out of range", CHAT, body(presence_penalty=5), {}, 400, "presence_penalty"),
    ("10,000 messages", CHAT, json.dumps({"messages": OK_MESSAGE * 10_000}).encode(), {}, 400, "too_many_messages"),
    ("1 MB of text", CHAT, messages({"role": "user", "content": "舌" * 350_000}), {}, 400, "context_length_exceeded"),
    ("invalid UTF-8", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe bad"}]}', {}, 400, None),
    (
        "image in a system message",
        CHAT,
        messages(image_message(images.as_data_uri(images.png()), "system"), *OK_MESSAGE),
        {},
        400,
        "messages[0].content[1]",
    ),
    ("bad base64", CHAT, messages(image_message("data:image/png;base64,@@@@")), {}, 400, "messages[0].content[1]"),
    (
        "not an image",
        CHAT,
        messages(image_message(images.as_data_uri(images.random_bytes()))),
        {},
        400,
        "invalid_image",
    ),
    (
        "decompression bomb",
        CHAT,
        messages(image_message(images.as_data_uri(images.png_bomb()))),
        {},
        413,
        "image_too_large",
    ),
    ("file URL", CHAT, messages(image_message("file:///etc/passwd")), {}, 400, "unsupported_image_source"),
    (
        "web URL without allowlist",
        CHAT,
        messages(image_message("http://169.254.169.254/latest")),
        {},
        400,
        "image_url_not_allowed",
    ),
    (
        "duplicate keys (last wins: empty)",
        CHAT,
        b'{"messages": [{"role": "user", "content": "hi"}], "messages": []}',
        {},
        400,
        "messages",
    ),
    ("tools", CHAT, body(tools=[{"type": "function", "function": {"name": "f"}}]), {}, 400, "tools"),
    ("unknown model", CHAT, body(model="gpt-5"), {}, 404, "model_not_found"),
    ("text/plain body", CHAT, body(), {"Content-Type": "text/plain"}, 400, None),
    ("vision without image", "/v1/vision/analyze", b'{"prompt": "hi"}', {}, 400, "image_required"),
    ("vision as text/plain", "/v1/vision/analyze", b"hello", {"Content-Type": "text/plain"}, 415, None),
    ("no API key", CHAT, body(), {"Authorization": ""}, 401, "invalid_api_key"),
    ("wrong API key", CHAT, body(), {"Authorization": "Bearer sk-wrong"}, 401, "invalid_api_key"),
    ("basic auth", CHAT, body(), {"Authorization": f"Basic {KEY}"}, 401, "invalid_api_key"),
    ("unknown route", "/v1/embeddings", body(), {}, 404, None),
]


def check_envelope(response: httpx.Response, status: int, fragment: str | None) -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if fragment:
        assert fragment in (error["param"] or "") or fragment == error["code"], error


@pytest.mark.parametrize(
    ("name", "path", "raw", "headers", "status", "fragment"), CASES, ids=[case[0] for case in CASES]
)
def test_hostile_request(server, name, path, raw, headers, status, fragment):
    sent = {"Content-Type": "application/json", **AUTH, **headers}
    sent = {key: value for key, value in sent.items() if value}
    response = httpx.post(server.url + path, content=raw, headers=sent, timeout=60)
    check_envelope(response, status, fragment)


def test_wrong_method_is_405(server):
    check_envelope(httpx.get(server.url + CHAT, headers=AUTH, timeout=10), 405, None)


def raw_exchange(port: int, head: bytes, body: bytes = b"", wait: float = 10) -> bytes:
    """Send bytes on a raw socket and read the reply (for bodies no HTTP client would send)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as connection:
        connection.sendall(head + body)
        reply = b""
        try:
            while chunk := connection.recv(65536):
                reply += chunk
                if b"\r\n\r\n" in reply and b'"error"' in reply and reply.rstrip().endswith(b"}"):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    return reply


def test_a_100_mb_body_is_refused_before_it_is_read(server):
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {100 * 2**20}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    reply = raw_exchange(server.port, head, b'{"messages": [')
    assert reply.startswith(b"HTTP/1.1 413") and b"request_too_large" in reply
    assert time.monotonic() - started < 10  # answered without waiting for 100 MB


def test_a_chunked_body_over_the_limit_is_refused(server):
    def forty_megabytes():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"a" * 2**20

    response = httpx.post(
        server.url + CHAT, content=forty_megabytes(), headers={**AUTH, "Content-Type": "application/json"}, timeout=60
    )
    check_envelope(response, 413, "request_too_large")


def test_a_slow_loris_body_is_cut_off(server):
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n"
    ).encode()
    reply = raw_exchange(server.port, head, b'{"messages"', wait=20)
    assert reply.startswith(b"HTTP/1.1 408") and b"body_timeout" in reply


def test_200_concurrent_clients_against_a_queue_of_32(server):
    async def burst():
        limits = httpx.Limits(max_connections=220)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120, limits=limits) as client:
            request = {"messages": OK_MESSAGE, "max_tokens": 256, "ignore_eos": True}  # slower than arrivals
            return await asyncio.gather(*(client.post(CHAT, json=request) for _ in range(200)))

    responses = asyncio.run(burst())
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 429}, statuses
    # The first MAX_QUEUE=32 always find room in the queue; how many more got in, and whether any was refused
    # at all, depends on how fast the inference thread moved waiting requests into the batch of 8 while the
    # burst arrived (a deterministic 429 is tested in tests/app). What never depends on speed: the queue
    # never held more than MAX_QUEUE beyond the free batch rows.
    assert statuses.count(200) >= 32
    scheduler = httpx.get(f"{server.url}/health", headers=AUTH, timeout=10).json()["scheduler"]
    assert scheduler["peak_waiting"] <= 32 + 8
    for response in responses:
        if response.status_code == 429:
            check_envelope(response, 429, "queue_full")
            assert int(response.headers["Retry-After"]) >= 1
        else:
            assert response.json()["usage"]["completion_tokens"] == 256


def test_clients_that_disconnect_at_random(server):
    rng = random.Random(7)
    before = httpx.get(f"{server.url}/health", headers=AUTH, timeout=10).json()["generation"]["finished"]

    async def impatient(client, index):
        # 4000 tokens take far longer than any client here waits: every one of them hangs up mid-way.
        request = {"messages": OK_MESSAGE, "max_tokens": 4000, "ignore_eos": True, "stream": index % 2 == 0}
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.post(CHAT, json=request), timeout=rng.uniform(0.05, 1.0))

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as client:
            await asyncio.gather(*(impatient(client, index) for index in range(30)))

    asyncio.run(run())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        health = httpx.get(f"{server.url}/health", headers=AUTH, timeout=10).json()
        if health["scheduler"]["running"] == 0 and health["scheduler"]["waiting"] == 0:
            break
        time.sleep(0.1)
    assert health["scheduler"] == {**health["scheduler"], "running": 0, "waiting": 0}
    after = health["generation"]["finished"]
    # Every generation the server started for them was aborted, none ran on to its 4000 tokens.
    assert after["abort"] > before["abort"] and after["length"] == before["length"]


def test_afterwards_the_server_is_healthy_and_memory_is_back(server):
    for _ in range(3):
        response = httpx.post(
            server.url + CHAT, json={"messages": OK_MESSAGE, "max_tokens": 4}, headers=AUTH, timeout=60
        )
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
    assert rss(server) < server.baseline_rss * 1.25 + 64 * 2**20
    log = server.log()
    assert KEY not in log and "other-key" not in log  # keys never reach the log


def test_the_log_shows_no_server_error(server):
    """No request was answered 5xx, nothing was logged at ERROR, no traceback: checked in what the log really
    writes (`status=500` in text, `"status": 500` in json; a search for `" 500 "` could never fail).

    The test hangs up on a non-streaming answer itself, so it does not depend on the battery's random
    disconnects having hit that moment."""
    # Imported here: the top of this file belongs to the battery.
    from tests.e2e.conftest import hold_request
    from tests.helpers import access_log_statuses, server_error_lines

    def generation():
        return httpx.get(f"{server.url}/health", headers=AUTH, timeout=10).json()["generation"]

    aborted = generation()["finished"]["abort"]
    request = {"messages": OK_MESSAGE, "max_tokens": 4000, "ignore_eos": True}
    with hold_request(server.url, CHAT, request, headers={**AUTH, "X-Request-ID": "hangs-up-mid-answer"}):
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/health", headers=AUTH, timeout=10).json()["scheduler"]["running"] == 0:
            assert time.monotonic() < deadline, "the request did not start"
            time.sleep(0.02)
    deadline = time.monotonic() + 60
    while generation()["finished"]["abort"] == aborted or "request_id=hangs-up-mid-answer " not in server.log():
        assert time.monotonic() < deadline, "the hang-up was neither aborted nor logged"
        time.sleep(0.05)
    ok = httpx.post(server.url + CHAT, json={"messages": OK_MESSAGE, "max_tokens": 2}, headers=AUTH, timeout=60)
    assert ok.status_code == 200
    log = server.log()
    assert access_log_statuses(log).count(200) >= 1  # the parser read the request lines (this test's 200)
    assert server_error_lines(log) == [], "\n".join(server_error_lines(log)[:10])
