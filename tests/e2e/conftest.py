"""Real servers: `python -m backend` in a subprocess on a free loopback port, with the tiny model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RunningServer:
    """A started server: its URL, process and log file."""

    url: str
    port: int
    process: subprocess.Popen
    log_path: Path
    baseline_rss: int = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running_server(model_dir: Path, log_dir: Path, headers: dict | None = None, cwd: Path = ROOT, **settings: str):
    """Start a server with the given settings (environment variables) in `cwd`, and stop it afterwards."""
    port = int(settings.get("PORT") or free_port())
    log_path = log_dir / f"server-{port}.log"
    env = {
        **os.environ,
        "MODEL_ID": str(model_dir),
        "SERVED_MODEL_NAME": "tiny",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        **settings,
    }
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "backend"], cwd=cwd, env=env, stdout=log, stderr=log)
    server = RunningServer(f"http://127.0.0.1:{port}", port, process, log_path)
    deadline = time.monotonic() + 120
    try:
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not become ready:\n{server.log()}")
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="session")
def server_url(tiny_vl_dir, tmp_path_factory):
    """Base URL of a running server with default settings."""
    with running_server(tiny_vl_dir, tmp_path_factory.mktemp("server")) as server:
        yield server.url
