"""A fake of RunPod's REST v2 API on a real loopback HTTP server, for testing `scripts/runpod.py`.

It follows the contract in `shared/docs/runpod.md`: Bearer keys, `POST /v2/pods` with a strictly checked
body (unknown fields rejected by name), pods that go PROVISIONING -> STARTING -> RUNNING as they are polled,
actions that are only valid in some states (409 otherwise), terminate answering 204, the GPU catalog with
prices and stock, RFC 9457 problem bodies, a GPU type with no capacity (400), too little balance (402), and
answers injected on demand (429 with Retry-After, 5xx). It also stands in for the pod's HTTPS proxy
(`/proxy/{pod_id}-{port}/health`), answering as Cloudflare and then the server would while a model loads.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

NO_CAPACITY = (
    "There are no longer any instances available with the requested specifications. Please refresh and try again."
)
CATALOG = {  # id: (display name, memory GB, secure $/h, community $/h or None when not offered)
    "NVIDIA A100 80GB PCIe": ("A100 PCIe", 80, 1.64, 1.19),
    "NVIDIA A100-SXM4-80GB": ("A100 SXM", 80, 1.74, 1.39),
    "NVIDIA H100 80GB HBM3": ("H100 SXM", 80, 2.99, 2.69),
    "NVIDIA A40": ("A40", 48, 0.44, None),
}
ACTIONS = {  # action: (states it is valid in, state it leads to)
    "stop": ({"PROVISIONING", "STARTING", "RUNNING"}, "EXITED"),
    "start": ({"EXITED"}, "STARTING"),
    "restart": ({"RUNNING"}, "STARTING"),
    "terminate": ({"PROVISIONING", "STARTING", "RUNNING", "EXITED", "ERROR"}, "TERMINATED"),
}
NEXT_STATE = {"PROVISIONING": "STARTING", "STARTING": "RUNNING"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GpuSpec(Strict):
    id: str = Field(min_length=1)
    count: int = Field(1, ge=1, le=8)


class PersistentMount(Strict):
    size: int = Field(ge=1)
    path: str = Field(pattern=r"^/")


class NetworkMount(Strict):
    volumeId: str = Field(min_length=1)
    path: str = Field(pattern=r"^/")


class Mounts(Strict):
    persistent: PersistentMount | None = None
    network: list[NetworkMount] | None = None


class CreatePod(Strict):
    name: str = Field(min_length=1)
    image: str = Field(min_length=1)
    gpu: GpuSpec | None = None
    cpu: dict[str, Any] | None = None
    cloud: Literal["SECURE", "COMMUNITY"] = "SECURE"
    dataCenterIds: list[str] | None = None
    disk: int = Field(50, ge=1)
    ports: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    mounts: Mounts | None = None
    args: str | None = None


class PodAction(Strict):
    action: Literal["start", "stop", "restart", "terminate"]


@dataclass
class Recorded:
    """A request as the fake received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeRunPod:
    """The fake's state; tests change it directly (capacity, balance, injected answers, health script)."""

    api_key: str = "rpa_TESTKEY0123456789abcdef"
    balance: float = 25.0
    no_capacity: set[tuple[str, str]] = field(default_factory=lambda: {("NVIDIA A100 80GB PCIe", "SECURE")})
    host_busy: set[str] = field(default_factory=set)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    injected: deque[tuple[int, dict[str, str], str]] = field(default_factory=deque)
    health_script: list[tuple[int, Any]] = field(default_factory=lambda: [
        (502, "<html>502 Bad Gateway</html>"), (503, {"status": "loading"}), (200, {"status": "ready"})])
    health_calls: dict[str, int] = field(default_factory=dict)
    server_key: str = ""  # when set, /health shows its details only to `Authorization: Bearer <server_key>`
    # Called with the body of each valid `POST /v2/pods` while the client waits for the answer: a test can look
    # at the client process as it is at that moment (its command line, for instance).
    on_create: Callable[[dict[str, Any]], None] | None = None
    url: str = ""
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def inject(self, status: int, times: int = 1, detail: str = "injected", **headers: str) -> None:
        """Answer the next `times` API requests with this status (after recording them)."""
        for _ in range(times):
            self.injected.append((status, {k.replace("_", "-"): v for k, v in headers.items()}, detail))

    def api_calls(self, method: str | None = None, path: str | None = None) -> list[Recorded]:
        """Recorded API requests, optionally filtered."""
        return [r for r in self.requests if (method is None or r.method == method) and (path is None or r.path == path)]

    def add_pod(self, status: str = "RUNNING", gpu_id: str = "NVIDIA A100-SXM4-80GB", **fields: Any) -> dict:
        """A pod that exists already (as if created earlier)."""
        name, _, secure, _ = CATALOG[gpu_id]
        pod = {"id": f"pod{next(self._ids):04d}x", "name": "shizhengpt", "image": "img", "status": status,
               "gpu": {"id": gpu_id, "count": 1, "displayName": name}, "cloud": "SECURE", "cost": secure,
               "disk": 40, "ports": ["8000/http", "22/tcp"], "env": {}, "mounts": {}, "lastStartedAt": None,
               "createdAt": datetime.now(UTC).isoformat()}
        pod.update(fields)
        if status == "RUNNING" and not pod["lastStartedAt"]:
            pod["lastStartedAt"] = datetime.now(UTC).isoformat()
        self.pods[pod["id"]] = pod
        return pod


def problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An RFC 9457 problem response."""
    return JSONResponse({"type": "about:blank", "title": title, "status": status, "detail": detail}, status,
                        headers=headers, media_type="application/problem+json")


def create_fake_app(fake: FakeRunPod) -> FastAPI:
    """The fake API as an ASGI app over the given state."""
    app = FastAPI()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        fields = "; ".join(".".join(str(p) for p in e["loc"][1:]) + ": " + e["msg"] for e in error.errors())
        return problem(422, "Unprocessable Entity", f"Invalid request body: {fields}")

    @app.middleware("http")
    async def record_and_authorize(request: Request, call_next):
        if request.url.path.startswith("/proxy/"):
            return await call_next(request)
        raw = await request.body()
        body = json.loads(raw) if raw else None
        fake.requests.append(Recorded(request.method, request.url.path, request.url.query, dict(request.headers), body))
        if request.headers.get("authorization") != f"Bearer {fake.api_key}":
            return problem(401, "Unauthorized", "Invalid or missing API key.")
        if fake.injected:
            status, headers, detail = fake.injected.popleft()
            return problem(status, "Injected", detail, headers)
        return await call_next(request)

    def observe(pod: dict[str, Any]) -> dict[str, Any]:
        """Polling moves a pod along, one state per look, as provisioning does over time."""
        if pod["status"] in NEXT_STATE:
            pod["status"] = NEXT_STATE[pod["status"]]
            if pod["status"] == "RUNNING":
                pod["lastStartedAt"] = datetime.now(UTC).isoformat()
        return pod

    @app.get("/v2/catalog/gpus")
    async def catalog(product: Literal["POD", "SERVERLESS"], include: str = "") -> dict:
        gpus = []
        for gpu_id, (name, memory, secure, community) in CATALOG.items():
            entry: dict[str, Any] = {"id": gpu_id, "displayName": name, "memoryInGb": memory,
                                     "securePrice": secure, "communityPrice": community}
            if "AVAILABILITY" in include.split(","):
                entry["availability"] = {
                    cloud.lower(): {"stockStatus": "NONE" if (gpu_id, cloud) in fake.no_capacity else "HIGH"}
                    for cloud, price in (("SECURE", secure), ("COMMUNITY", community)) if price is not None
                }
            gpus.append(entry)
        return {"gpus": gpus}

    @app.post("/v2/pods", status_code=201)
    async def create_pod(body: CreatePod):
        if fake.on_create is not None:
            fake.on_create(body.model_dump())
        if (body.gpu is None) == (body.cpu is None):
            return problem(400, "Bad Request", "Exactly one of gpu or cpu must be set.")
        if body.mounts and body.mounts.persistent and body.mounts.network:
            return problem(400, "Bad Request", "mounts.persistent and mounts.network are mutually exclusive.")
        if body.gpu.id not in CATALOG:
            return problem(400, "Bad Request", f"Unknown GPU type: {body.gpu.id}")
        name, _, secure, community = CATALOG[body.gpu.id]
        price = secure if body.cloud == "SECURE" else community
        if price is None or (body.gpu.id, body.cloud) in fake.no_capacity:
            return problem(400, "Bad Request", NO_CAPACITY)
        hourly = round(price * body.gpu.count, 2)
        if fake.balance < hourly:
            return problem(402, "Payment Required",
                           f"Insufficient balance: ${fake.balance:.2f} is less than one hour of this pod.")
        pod = fake.add_pod("PROVISIONING", body.gpu.id, name=body.name, image=body.image, cloud=body.cloud,
                           cost=hourly, disk=body.disk, ports=body.ports, env=body.env,
                           mounts=body.mounts.model_dump(exclude_none=True) if body.mounts else {})
        pod["gpu"] = {"id": body.gpu.id, "count": body.gpu.count, "displayName": name}
        return JSONResponse(pod, 201)

    @app.get("/v2/pods")
    async def list_pods() -> dict:
        return {"pods": [observe(pod) for pod in fake.pods.values()]}

    @app.get("/v2/pods/{pod_id}")
    async def get_pod(pod_id: str):
        if pod_id not in fake.pods:
            return problem(404, "Not Found", f"Pod {pod_id} not found.")
        return observe(fake.pods[pod_id])

    @app.post("/v2/pods/{pod_id}/action")
    async def pod_action(pod_id: str, body: PodAction):
        pod = fake.pods.get(pod_id)
        if pod is None:
            return problem(404, "Not Found", f"Pod {pod_id} not found.")
        valid_in, leads_to = ACTIONS[body.action]
        if pod["status"] not in valid_in:
            return problem(409, "Conflict", f"Cannot {body.action} a pod that is {pod['status']}.")
        if body.action == "start" and pod_id in fake.host_busy:
            return problem(409, "Conflict", "There are not enough free GPUs on the host machine to start this pod.")
        if body.action == "terminate":
            del fake.pods[pod_id]
            return Response(status_code=204)
        pod["status"] = leads_to
        if leads_to == "EXITED":
            pod["lastStartedAt"] = None
        return pod

    @app.get("/proxy/{target}/health")
    async def proxied_health(target: str, request: Request):
        pod_id = target.rsplit("-", 1)[0]
        pod = fake.pods.get(pod_id)
        if pod is None or pod["status"] != "RUNNING":
            return HTMLResponse("<html>404 Not Found</html>", 404)
        calls = fake.health_calls[pod_id] = fake.health_calls.get(pod_id, 0) + 1
        status, body = fake.health_script[min(calls, len(fake.health_script)) - 1]
        if isinstance(body, str):
            return HTMLResponse(body, status)
        if fake.server_key and request.headers.get("authorization") != f"Bearer {fake.server_key}":
            body = {"status": body.get("status")}  # as the server answers a caller without its key
        return JSONResponse(body, status)

    return app


class FakeRunPodServer:
    """The fake API served by uvicorn on a free loopback port, in a background thread."""

    def __init__(self, fake: FakeRunPod):
        self.fake = fake
        # Bound here, port chosen by the kernel, and handed to uvicorn: no other process can take it between.
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        port = self.socket.getsockname()[1]
        config = uvicorn.Config(create_fake_app(fake), log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        fake.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> FakeRunPod:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the fake RunPod API did not start")
            time.sleep(0.02)
        return self.fake

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()
