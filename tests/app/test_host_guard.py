"""Host names, web origins and CORS, and what /health tells a caller without a key."""

import httpx
import pytest
from asgi_lifespan import LifespanManager

from backend.app import create_app
from backend.host_guard import HostPolicy, split_host
from tests.conftest import make_settings

CHAT = "/v1/chat/completions"
HELLO = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
async def served(tiny_vl_dir):
    """Apps built with different settings, one lifespan each, closed at the end of the module."""
    managers = []

    async def serve(base_url="http://localhost:8000", **settings):
        app = create_app(make_settings(tiny_vl_dir, port=8000, **settings))
        manager = LifespanManager(app, startup_timeout=60)
        await manager.__aenter__()
        managers.append(manager)
        await app.state.engine.wait_until_loaded()
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url, timeout=60)

    yield serve
    for manager in managers:
        await manager.__aexit__(None, None, None)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:8000", True),
        ("localhost:8000", True),
        ("[::1]:8000", True),
        ("203.0.113.7:8000", True),  # an IP address is never a rebinding attack's name
        ("pod123-8000.proxy.runpod.net", True),
        ("pod999-8000.proxy.runpod.net", False),
        ("shizhen.clinic.example", True),
        ("api.shizhen.clinic.example", False),
        ("evil.example", False),
        ("localhost.evil.example", False),
        ("notes.partner.example", True),
        ("partner.example", True),
    ],
)
def test_host_policy(host, allowed):
    policy = HostPolicy.from_settings(
        ["shizhen.clinic.example", "*.partner.example"], [], runpod_pod_id="pod123", ports=[8000]
    )
    assert policy.host_allowed(host) is allowed


def test_split_host():
    assert [split_host(value) for value in ("A.Example:80", "[::1]:8000", "::1", "example.com.")] == [
        "a.example",
        "::1",
        "::1",
        "example.com",
    ]


async def test_a_rebinding_host_name_is_refused_everywhere(served):
    client = await served()
    for path in ("/health", "/v1/models", "/"):
        response = await client.get(path, headers={"Host": "attacker.example:8000"})
        assert response.status_code == 400, path
        assert response.json()["error"]["code"] == "invalid_host"
    assert (await client.get("/health", headers={"Host": "127.0.0.1:8000"})).status_code == 200


async def test_a_page_from_another_site_cannot_use_a_local_server_by_default(served):
    """The audit's case: a multipart form POST (a simple request, no preflight) from any web page."""
    client = await served()
    files = {"image": ("t.png", b"\x89PNG", "image/png")}
    response = await client.post("/v1/vision/analyze", files=files, headers={"Origin": "https://evil.example"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in response.headers
    response = await client.post(CHAT, json=HELLO, headers={"Origin": "null"})
    assert response.status_code == 403


async def test_the_servers_own_page_may_call_it(served):
    client = await served(runpod_pod_id="pod123")
    for origin, host in [
        ("http://localhost:8000", "localhost:8000"),
        ("https://pod123-8000.proxy.runpod.net", "pod123-8000.proxy.runpod.net"),
        ("http://203.0.113.7:8000", "203.0.113.7:8000"),
    ]:
        response = await client.post(CHAT, json=HELLO, headers={"Origin": origin, "Host": host})
        assert response.status_code == 200, (origin, response.text)


async def test_behind_a_proxy_the_forwarded_host_is_the_servers_own(served):
    client = await served(runpod_pod_id="pod123")
    headers = {"Origin": "https://pod123-8000.proxy.runpod.net", "Host": "10.0.0.5:8000"}
    assert (await client.post(CHAT, json=HELLO, headers=headers)).status_code == 200  # the pod's proxy name
    headers = {
        "Origin": "https://chat.clinic.example",
        "Host": "10.0.0.5:8000",
        "X-Forwarded-Host": "chat.clinic.example",
    }
    assert (await client.post(CHAT, json=HELLO, headers=headers)).status_code == 200


async def test_listed_origins_get_cors_and_others_do_not(served):
    client = await served(cors_origins="https://chat.clinic.example")
    preflight = await client.options(
        CHAT, headers={"Origin": "https://chat.clinic.example", "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://chat.clinic.example"
    allowed = await client.post(CHAT, json=HELLO, headers={"Origin": "https://chat.clinic.example"})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://chat.clinic.example"
    other = await client.post(CHAT, json=HELLO, headers={"Origin": "https://other.example"})
    assert other.status_code == 403 and "access-control-allow-origin" not in other.headers


async def test_no_cors_headers_by_default(served):
    client = await served()
    preflight = await client.options(
        CHAT, headers={"Origin": "https://chat.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers


async def test_with_keys_health_without_one_tells_only_the_status(served):
    client = await served(api_key="sk-operator-123")
    bare = await client.get("/health")
    assert bare.status_code == 200 and bare.json() == {"status": "ready"}
    full = await client.get("/health", headers={"Authorization": "Bearer sk-operator-123"})
    assert full.status_code == 200
    body = full.json()
    assert body["model_id"] and "memory" in body and body["served_model_name"] == "tiny"
    assert (await client.get("/ping")).status_code == 200


async def test_without_keys_health_shows_the_details(served):
    client = await served()
    body = (await client.get("/health")).json()
    assert body["status"] == "ready" and "memory" in body and body["served_model_name"] == "tiny"


async def test_with_keys_a_failed_load_is_explained_only_to_the_operator(served, tmp_path):
    client = await served(api_key="sk-operator-123", model_id=str(tmp_path))  # an empty folder: no model
    for path in ("/health", "/ping"):
        bare = await client.get(path)
        assert bare.status_code == 503 and str(tmp_path) not in bare.text, path
    assert (await client.get("/ping")).json()["error"]["message"] == "The model is not available."
    keyed = {"Authorization": "Bearer sk-operator-123"}
    assert str(tmp_path) in (await client.get("/ping", headers=keyed)).json()["error"]["message"]
    assert str(tmp_path) in (await client.get("/health", headers=keyed)).json()["error"]
