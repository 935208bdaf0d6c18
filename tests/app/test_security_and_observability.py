"""API keys, request ids, the structured log line, and Prometheus metrics, over ASGI."""

import json
import logging

import httpx
import pytest
from asgi_lifespan import LifespanManager

from backend.app import create_app, warn_about_exposure
from backend.logging_setup import JsonFormatter, TextFormatter
from tests.conftest import make_settings
from tests.helpers import access_log_statuses, server_error_lines, wait_until_idle

KEYS = "sk-alpha-1111,sk-beta-2222"
CHAT = "/v1/chat/completions"
HELLO = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 5, "temperature": 0}


@pytest.fixture(scope="module")
async def keyed(tiny_vl_dir):
    app = create_app(make_settings(tiny_vl_dir, api_key=KEYS, cors_origins="https://clinic.example"))
    async with LifespanManager(app, startup_timeout=60):
        await app.state.engine.wait_until_loaded()
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://localhost", timeout=60
        ) as client:
            yield client


async def test_open_routes_need_no_key(keyed):
    for path in ("/health", "/ping", "/metrics", "/", "/static/app.js", "/static/style.css"):
        assert (await keyed.get(path)).status_code == 200, path
    page = await keyed.get("/")
    assert page.headers["content-type"].startswith("text/html") and "时珍GPT" in page.text


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer sk-wrong", "Basic sk-alpha-1111", "bearer sk-alpha-111", "Bearer sk-alpha-1111x"],
)
async def test_protected_routes_refuse_missing_or_wrong_keys(keyed, authorization):
    headers = {"Authorization": authorization} if authorization is not None else {}
    for method, path in (("GET", "/v1/models"), ("POST", CHAT), ("POST", "/v1/vision/analyze"), ("GET", "/docs")):
        response = await keyed.request(method, path, headers=headers, json=HELLO if method == "POST" else None)
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"


async def test_every_configured_key_works(keyed):
    for key in KEYS.split(","):
        response = await keyed.post(CHAT, json=HELLO, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200


async def test_cors_preflight_and_401_carry_cors_headers(keyed):
    origin = {"Origin": "https://clinic.example"}
    preflight = await keyed.options(CHAT, headers={**origin, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://clinic.example"
    refused = await keyed.post(CHAT, json=HELLO, headers=origin)
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "https://clinic.example"
    other = await keyed.options(
        CHAT, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in other.headers


async def test_request_id_is_echoed_or_made(keyed):
    auth = {"Authorization": "Bearer sk-alpha-1111"}
    given = await keyed.get("/v1/models", headers={**auth, "X-Request-ID": "clinic-42.a"})
    assert given.headers["x-request-id"] == "clinic-42.a"
    made = await keyed.get("/v1/models", headers={**auth, "X-Request-ID": "bad id with spaces\n"})
    assert made.headers["x-request-id"] != "bad id with spaces\n" and len(made.headers["x-request-id"]) == 32


async def test_one_structured_log_line_per_request_and_no_keys_in_logs(keyed, caplog):
    with caplog.at_level(logging.DEBUG):
        await keyed.post(CHAT, json=HELLO, headers={"Authorization": "Bearer sk-beta-2222", "X-Request-ID": "r-1"})
        await keyed.post(CHAT, json=HELLO, headers={"Authorization": "Bearer sk-wrong-9999"})
    lines = [record.fields for record in caplog.records if record.name == "backend.access"]
    assert len(lines) == 2
    ok, refused = lines
    assert ok["request_id"] == "r-1" and ok["route"] == CHAT and ok["status"] == 200
    assert ok["prompt_tokens"] > 0 and ok["completion_tokens"] == 5 and ok["images"] == 0
    assert {"queue_ms", "ttft_ms", "total_ms", "finish_reason"} <= set(ok)
    assert refused["status"] == 401
    everything = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    assert "sk-beta-2222" not in everything and "sk-wrong-9999" not in everything


def test_log_formats():
    record = logging.LogRecord("backend.access", logging.INFO, __file__, 1, "request", None, None)
    record.fields = {"request_id": "abc", "status": 200, "text": "舌"}
    parsed = json.loads(JsonFormatter().format(record))
    assert parsed["message"] == "request" and parsed["request_id"] == "abc" and parsed["text"] == "舌"
    assert TextFormatter().format(record).endswith("request request_id=abc status=200 text=舌")


def test_exposure_warnings(caplog, tiny_vl_dir):
    with caplog.at_level(logging.WARNING, logger="backend.app"):
        warn_about_exposure(make_settings(tiny_vl_dir, host="0.0.0.0"))
        warn_about_exposure(make_settings(tiny_vl_dir, host="127.0.0.1"))
        warn_about_exposure(make_settings(tiny_vl_dir, host="0.0.0.0", api_key="k", cors_origins="*"))
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "No API_KEY" in messages[0] and "0.0.0.0" in messages[0]
    assert "CORS_ORIGINS=*" in messages[1]


def test_the_log_checks_read_what_the_formatters_write():
    """The e2e tests look for 5xx in a server's log with these parsers: they must find a 500 in the lines
    the real formatters write (a check for `" 500 "` never could: the text format writes `status=500`)."""

    def access(status, route="/v1/chat/completions"):
        record = logging.LogRecord("backend.access", logging.INFO, __file__, 1, "request", None, None)
        record.fields = {"request_id": "r", "method": "POST", "route": route, "status": status, "total_ms": 1.0}
        return record

    failure = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "Exception in ASGI app", (), None)
    for formatter in (TextFormatter(), JsonFormatter()):
        lines = [formatter.format(record) for record in (access(200), access(500), access(499), failure)]
        log = "\n".join(lines)
        assert access_log_statuses(log) == [200, 500, 499]
        assert server_error_lines(log) == [lines[1], lines[3]]
        # A client's path cannot hide a 5xx behind a status of its own.
        spoofed = formatter.format(access(503, route="/x status=200 total_ms=1"))
        assert access_log_statuses(spoofed) == [503] and server_error_lines(spoofed) == [spoofed]


def metric_value(text: str, name: str, absent: float | None = None, **labels) -> float:
    """A sample's value; `absent` is the value of a series not exported yet (a labelled series appears at
    its first observation), otherwise a missing series is an error."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{key}="{value}"' in line for key, value in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    if absent is not None:
        return absent
    raise AssertionError(f"{name} {labels} not in metrics")


def metric_increase(before: str, after: str, name: str, **labels) -> float:
    """How much a series grew between two scrapes (from nothing, if this app had not observed it yet)."""
    return metric_value(after, name, **labels) - metric_value(before, name, absent=0.0, **labels)


async def test_metrics_follow_vllm_names_and_count_exactly(client):
    engine = client._transport.app.state.engine
    await wait_until_idle(engine)  # an earlier test's request must not be counted between the two snapshots
    before = (await client.get("/metrics")).text
    response = await client.post(CHAT, json=HELLO)
    assert response.status_code == 200
    usage = response.json()["usage"]
    await wait_until_idle(engine)  # the answer can arrive a step before its row leaves the batch
    after = (await client.get("/metrics")).text
    labels = {"model_name": "tiny"}
    for name in ("vllm:generation_tokens_total", "vllm:prompt_tokens_total"):
        assert metric_increase(before, after, name, **labels) == (
            usage["completion_tokens"] if "generation" in name else usage["prompt_tokens"]
        )
    assert metric_increase(before, after, "vllm:request_success_total", finished_reason="length") == 1
    for histogram in (
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
    ):
        # Earlier tests on the same app observed these too: only the difference belongs to this request.
        assert metric_increase(before, after, histogram + "_count", **labels) == 1, histogram
    assert metric_value(after, "vllm:num_requests_running", **labels) == 0
    assert metric_value(after, "vllm:num_requests_waiting", **labels) == 0
    assert metric_value(after, "shizhen:process_resident_memory_bytes", **labels) > 0
    assert (await client.get("/metrics")).headers["content-type"].startswith("text/plain")


async def test_bodies_over_the_limit_are_413_before_reading(tiny_vl_dir):
    app = create_app(make_settings(tiny_vl_dir, max_request_bytes=1000))
    async with LifespanManager(app, startup_timeout=60):
        await app.state.engine.wait_until_loaded()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as client:
            big = {"messages": [{"role": "user", "content": "x" * 5000}]}
            response = await client.post(CHAT, json=big)
            assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

            async def chunks():
                yield b'{"messages": [{"role": "user", "content": "'
                yield b"y" * 3000
                yield b'"}]}'

            response = await client.post(CHAT, content=chunks(), headers={"Content-Type": "application/json"})
            assert response.status_code == 413
            assert (await client.post(CHAT, json=HELLO)).status_code == 200
