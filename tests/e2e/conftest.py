"""Real servers: `python -m backend` in a subprocess on a loopback port, with the tiny model.

The port is chosen here and then bound by the server, so another process can take it in between. A server
counts as started only when its own log (the child's stdout) says that it listens on that port: then the
port is ours, and whatever answers on it is this server. If the bind lost the race, the server is started
again on another port. (PORT=0, which would let the kernel choose, is refused by the settings' PORT >= 1.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import ROOT

START_ATTEMPTS = 5  # servers restarted because another process took the chosen port first


def free_port() -> int:
    """A port that was free a moment ago. Racy: whoever binds it next must prove it got it (running_server
    reads its server's log); prefer running_server's own choice."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RunningServer:
    """A started server: its URL, process and log file (and its health port, when it has one)."""

    url: str
    port: int
    process: subprocess.Popen
    log_path: Path
    baseline_rss: int = 0
    health_port: int | None = None

    @property
    def health_url(self) -> str:
        assert self.health_port is not None, "started without a health port"
        return f"http://127.0.0.1:{self.health_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        """Wait until the server's log contains `text` (a state the server reports, instead of a sleep)."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                pytest.fail(f"{text!r} did not appear in the server log within {timeout:g} s:\n{self.log()}")
            time.sleep(0.02)


def hold_request(url: str, path: str, body: dict, headers: dict[str, str] | None = None) -> socket.socket:
    """Send a POST on a raw connection and leave it open: the request runs until the caller closes the socket
    (a client that hangs up). Returns the connected socket."""
    address = urlsplit(url)
    payload = json.dumps(body).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    connection = socket.create_connection((address.hostname, address.port), timeout=60)
    connection.sendall(head + payload)
    return connection


def listening_line(port: int) -> str:
    """What uvicorn logs once it listens on `port` (uvicorn/server.py, `_log_started_message`)."""
    return f"Uvicorn running on http://127.0.0.1:{port} "


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM (the server's own graceful shutdown), then SIGKILL if it has not ended within 30 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def _start(model_dir: Path, log_dir: Path, cwd: Path, health: str | None, settings: dict[str, str], python: str):
    """Start one server and wait until its log proves it listens on its port(s). Returns the server, or None
    when another process had bound a port first (the caller tries again with other ports)."""
    chosen = "PORT" not in settings
    port = int(settings["PORT"]) if not chosen else free_port()
    health_port = {"own": free_port, "same": lambda: port, None: lambda: None}[health]()
    if health_port == port and health == "own":
        health_port = free_port()
    log_path = log_dir / f"server-{port}.log"
    env = {
        **os.environ,
        "MODEL_ID": str(model_dir),
        "SERVED_MODEL_NAME": "tiny",
        "HOST": "127.0.0.1",
        "HF_HUB_OFFLINE": "1",
        # The tests expect the tiny model on the CPU in float32, whatever the machine has.
        "DEVICE_MAP": "cpu",
        "DTYPE": "float32",
        **settings,
        "PORT": str(port),
    }
    if health_port is not None:
        env["PORT_HEALTH"] = str(health_port)
    with open(log_path, "w") as log:
        process = subprocess.Popen([python, "-m", "backend"], cwd=cwd, env=env, stdout=log, stderr=log)
    server = RunningServer(f"http://127.0.0.1:{port}", port, process, log_path, health_port=health_port)
    lines = [listening_line(port)] + ([listening_line(health_port)] if health == "own" else [])
    deadline = time.monotonic() + 120
    while not all(line in server.log() for line in lines):
        if "address already in use" in server.log() and (chosen or health == "own"):
            _stop(process)  # lost a port to another process between free_port() and the bind
            return None
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode} before listening:\n{server.log()}")
        if time.monotonic() > deadline:
            _stop(process)
            pytest.fail(f"server did not start listening within 120 s:\n{server.log()}")
        time.sleep(0.05)
    if f"Started server process [{process.pid}]" not in server.log():
        _stop(process)
        pytest.fail(f"the log is not that of process {process.pid}:\n{server.log()}")
    return server


def _wait_for_state(server: RunningServer, wait_for: str, timeout: float) -> None:
    """Wait until /health reports `wait_for` (`ready`, or `error` for a server whose model fails to load)."""
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"server did not become {wait_for}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).json().get("status") == wait_for:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.1)


@contextmanager
def running_server(
    model_dir: Path,
    log_dir: Path,
    headers: dict | None = None,
    cwd: Path = ROOT,
    health: str | None = None,
    wait_for: str = "ready",
    python: str = sys.executable,
    load_timeout: float = 120,
    **settings: str,
):
    """Start a server with the given settings (environment variables) in `cwd`, and stop it afterwards.

    The port is chosen here unless PORT is given. `health="own"` adds PORT_HEALTH on a port of its own,
    `health="same"` sets PORT_HEALTH to PORT. `wait_for="error"` waits for a model that fails to load.
    `python` runs the server (the vLLM engine's lives in .venv-vllm); the load may take `load_timeout` s.
    """
    for _ in range(START_ATTEMPTS):
        server = _start(model_dir, log_dir, cwd, health, settings, python)
        if server is not None:
            break
    else:
        pytest.fail(f"another process took the chosen port {START_ATTEMPTS} times in a row")
    try:
        _wait_for_state(server, wait_for, load_timeout)
        yield server
    finally:
        _stop(server.process)


@pytest.fixture(scope="session")
def server_url(tiny_vl_dir, tmp_path_factory):
    """Base URL of a running server with default settings."""
    with running_server(tiny_vl_dir, tmp_path_factory.mktemp("server")) as server:
        yield server.url
