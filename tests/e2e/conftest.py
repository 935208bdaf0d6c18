"""A real server: `python -m backend` in a subprocess on a free loopback port, with the tiny model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def server_url(tiny_vl_dir, tmp_path_factory):
    """Base URL of a running server; its log is printed if it fails to become ready."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = {
        **os.environ,
        "MODEL_ID": str(tiny_vl_dir),
        "SERVED_MODEL_NAME": "tiny",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "HF_HUB_OFFLINE": "1",
    }
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "backend"], cwd=ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not become ready:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
