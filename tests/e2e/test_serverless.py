"""The serverless image without Docker: its files linted, and its layout and settings served for real.

No Docker engine runs here, so the test reads the Dockerfile's COPY and ENV lines, lays out /app as the
image would, and runs the image's command there with a separate health port, as a RunPod load-balancing
endpoint does (PORT for requests, GET /ping on PORT_HEALTH).
"""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import running_server
from tests.e2e.test_deploy_runpod import seed_hub_cache

TOOLS = Path(sys.executable).parent  # hadolint and shellcheck come with requirements-dev.txt


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    logical = []
    for line in text.replace("\\\n", " ").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            logical.append((keyword.upper(), rest.strip()))
    return logical


def test_dockerfile_and_shell_scripts_pass_their_linters():
    hadolint = subprocess.run([TOOLS / "hadolint", ROOT / "Dockerfile"], capture_output=True, text=True, check=False)
    assert hadolint.returncode == 0, hadolint.stdout + hadolint.stderr
    scripts = [ROOT / "deploy_runpod.sh", ROOT / ".ci" / "run", *sorted((ROOT / "scripts").glob("*.sh"))]
    shellcheck = subprocess.run([TOOLS / "shellcheck", *scripts], capture_output=True, text=True, check=False)
    assert shellcheck.returncode == 0, shellcheck.stdout + shellcheck.stderr


def test_the_image_layout_serves_requests_on_port_and_health_on_port_health(tiny_vl_dir, tmp_path):
    instructions = dockerfile_instructions()
    app = tmp_path / "app"
    app.mkdir()
    for keyword, arguments in instructions:
        if keyword == "COPY":
            *sources, _ = shlex.split(arguments)
            for source in sources:
                target = app / source
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(ROOT / source, target)
    image_env = dict(
        pair.split("=", 1) for keyword, arguments in instructions if keyword == "ENV" for pair in shlex.split(arguments)
    )
    assert image_env["HOST"] == "0.0.0.0" and image_env["HF_HOME"].startswith("/runpod-volume/")
    assert sorted(path.name for path in app.iterdir()) == ["backend", "requirements.txt"]

    # The network volume already holds the image's MODEL_ID (the tiny checkpoint under that name), as after a
    # first worker downloaded it: the server must find it in HF_HOME and start with no network.
    volume = tmp_path / "runpod-volume"
    seed_hub_cache(volume, tiny_vl_dir, repo=image_env["MODEL_ID"])
    # The image's environment, with a loopback address, ports of the test's own (PORT, and PORT_HEALTH on a
    # port proven to be this server's) and the volume in a temporary folder.
    settings = {**image_env, "HOST": "127.0.0.1", "HF_HOME": str(volume / "models")}
    settings.pop("PORT")
    settings.pop("PORT_HEALTH", None)
    with running_server(tiny_vl_dir, tmp_path, cwd=app, health="own", **settings) as server:
        health_port, health_url = server.health_port, server.health_url
        assert httpx.get(f"{health_url}/ping", timeout=10).status_code == 200
        health = httpx.get(f"{health_url}/health", timeout=10).json()
        assert health["status"] == "ready" and health["model_id"] == image_env["MODEL_ID"]
        other = httpx.get(f"{health_url}/v1/models", timeout=10)
        assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
        chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "舌苔薄白"}], "max_tokens": 4})
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(f"{server.url}/ping", timeout=10).status_code == 200  # PORT answers /ping as well

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{health_url}/ping", timeout=3)
    assert f"Uvicorn running on http://127.0.0.1:{health_port}" in server.log()


def test_port_health_equal_to_port_serves_one_port(tiny_vl_dir, tmp_path):
    with running_server(tiny_vl_dir, tmp_path, health="same") as server:
        assert server.health_port == server.port
        assert httpx.get(f"{server.url}/ping", timeout=10).status_code == 200
    assert server.log().count("Uvicorn running on") == 1
