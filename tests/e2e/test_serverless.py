"""The serverless images without Docker: their files linted, and their layout and settings served for real.

No Docker engine runs here, so the tests read a Dockerfile's COPY and ENV lines, lay out /app as the image
would, and run the image's command there with a separate health port, as a RunPod load-balancing endpoint
does (PORT for requests, GET /ping on PORT_HEALTH). `Dockerfile` is the transformers engine's image and is
served for real; `Dockerfile.vllm` (ENGINE=vllm) cannot run vLLM here, so what is checked is what can be:
its settings, its files, its install step and its command.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from backend.settings import Settings
from tests.conftest import ROOT
from tests.e2e.conftest import running_server
from tests.e2e.test_deploy_runpod import seed_hub_cache

TOOLS = Path(sys.executable).parent  # hadolint and shellcheck come with requirements-dev.txt
DOCKERFILES = ("Dockerfile", "Dockerfile.vllm")


def dockerfile_instructions(name: str = "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = (ROOT / name).read_text()
    logical = []
    for line in text.replace("\\\n", " ").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            logical.append((keyword.upper(), rest.strip()))
    return logical


def lay_out_app(instructions: list[tuple[str, str]], app: Path) -> list[str]:
    """Copy what the image's COPY lines copy into `app` (the image's WORKDIR); returns the sources."""
    copied = []
    for keyword, arguments in instructions:
        if keyword == "COPY":
            *sources, _ = shlex.split(arguments)
            for source in sources:
                target = app / source
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(ROOT / source, target)
                copied.append(source)
    return copied


def image_environment(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """The variables the image's ENV lines set."""
    return dict(
        pair.split("=", 1) for keyword, arguments in instructions if keyword == "ENV" for pair in shlex.split(arguments)
    )


def image_command(instructions: list[tuple[str, str]]) -> list[str]:
    """What the container runs: the last ENTRYPOINT followed by the last CMD (exec form, as both are written)."""
    entrypoint = [json.loads(arguments) for keyword, arguments in instructions if keyword == "ENTRYPOINT"]
    command = [json.loads(arguments) for keyword, arguments in instructions if keyword == "CMD"]
    return (entrypoint[-1] if entrypoint else []) + (command[-1] if command else [])


def included_requirements(folder: Path, name: str) -> set[str]:
    """`name` and every requirements file it pulls in with `-r`, recursively (as pip reads them)."""
    seen = {name}
    for line in (folder / name).read_text().splitlines():
        if line.strip().startswith("-r "):
            seen |= included_requirements(folder, line.split(maxsplit=1)[1].strip())
    return seen


def test_dockerfiles_and_shell_scripts_pass_their_linters():
    for name in DOCKERFILES:
        hadolint = subprocess.run([TOOLS / "hadolint", ROOT / name], capture_output=True, text=True, check=False)
        assert hadolint.returncode == 0, name + ": " + hadolint.stdout + hadolint.stderr
    scripts = [ROOT / "deploy_runpod.sh", ROOT / ".ci" / "run", *sorted((ROOT / "scripts").glob("*.sh"))]
    shellcheck = subprocess.run([TOOLS / "shellcheck", *scripts], capture_output=True, text=True, check=False)
    assert shellcheck.returncode == 0, shellcheck.stdout + shellcheck.stderr


def test_every_file_an_image_copies_is_in_the_build_context_with_what_it_includes():
    # .dockerignore leaves everything out (`*`) but the names it lets back in (`!name`): a COPY of any other
    # file fails the build, as would a requirements file whose `-r` include was not copied beside it.
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for name in DOCKERFILES:
        copied = [source for keyword, arguments in dockerfile_instructions(name) if keyword == "COPY"
                  for source in shlex.split(arguments)[:-1]]
        assert set(copied) <= allowed, (name, set(copied) - allowed)
        for source in copied:
            if source.startswith("requirements"):
                assert included_requirements(ROOT, source) <= set(copied), (name, source)


def test_the_image_layout_serves_requests_on_port_and_health_on_port_health(tiny_vl_dir, tmp_path):
    instructions = dockerfile_instructions()
    app = tmp_path / "app"
    app.mkdir()
    lay_out_app(instructions, app)
    image_env = image_environment(instructions)
    assert image_env["HOST"] == "0.0.0.0" and image_env["HF_HOME"].startswith("/runpod-volume/")
    assert image_env["WARMUP"] == "1"  # the first balanced request does not pay for the first generation
    assert sorted(path.name for path in app.iterdir()) == ["backend", "requirements-server.txt", "requirements.txt"]
    assert included_requirements(app, "requirements.txt") == {"requirements.txt", "requirements-server.txt"}
    assert image_command(instructions) == ["python3.11", "-m", "backend"]

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


FAKE_PYTHON3 = """#!/usr/bin/env bash
# python3 of a stand-in vllm/vllm-openai image: logs pip's arguments; pip replaces torch when told to.
echo "$*" >>"$FAKE_LOG"
case "$*" in
  "-m pip "*) if [[ -n "${FAKE_PIP_REPLACES_TORCH:-}" ]]; then touch "$FAKE_LOG.replaced"; fi ;;
  *"import torch, vllm"*)
    if [[ -f "$FAKE_LOG.replaced" ]]; then echo "torch 2.99.0 vllm 0.33.0"
    else echo "torch 2.9.0+cu129 vllm 0.33.0"; fi ;;
  *) echo "transformers 5.23.0" ;;
esac
"""


def test_the_vllm_image_serves_on_vllm_with_the_cache_on_the_volume(tmp_path, monkeypatch):
    instructions = dockerfile_instructions("Dockerfile.vllm")
    (base,) = [arguments.split("=", 1)[1] for keyword, arguments in instructions
               if keyword == "ARG" and arguments.startswith("BASE_IMAGE=")]
    repository, _, tag = base.partition(":")
    assert repository == "vllm/vllm-openai" and tag.startswith("v") and tag[1:].replace(".", "").isdigit()  # pinned
    assert [arguments for keyword, arguments in instructions if keyword == "FROM"] == ["${BASE_IMAGE}"]

    # The transformers image's settings, with ENGINE=vllm: same ports, volume cache, warm-up, logs and hosts.
    env = image_environment(instructions)
    assert env["ENGINE"] == "vllm" and env["WARMUP"] == "1" and env["HF_HOME"].startswith("/runpod-volume/")
    assert {name: value for name, value in env.items() if name != "ENGINE"} == image_environment(
        dockerfile_instructions())
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)  # as the server reads them: valid, and meaning what the comments say
    assert settings.engine == "vllm" and settings.warmup and settings.log_format == "json"
    assert settings.allowed_hosts == ["*"] and settings.host == "0.0.0.0" and settings.port_health == settings.port
    assert str(settings.hf_home) == "/runpod-volume/models"

    # vLLM's image starts `vllm serve` from its ENTRYPOINT: cleared, so the container runs our server.
    assert [arguments for keyword, arguments in instructions if keyword == "ENTRYPOINT"] == ["[]"]
    assert image_command(instructions) == ["python3", "-m", "backend"]

    app = tmp_path / "app"
    app.mkdir()
    lay_out_app(instructions, app)
    copied = sorted(path.name for path in app.iterdir())
    assert copied == ["backend", "requirements-server.txt", "requirements-vllm.txt"]
    assert included_requirements(app, "requirements-vllm.txt") == {"requirements-vllm.txt", "requirements-server.txt"}
    found = subprocess.run([sys.executable, "-c", "import backend.__main__ as m; print(m.__file__)"], cwd=app,
                           capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"})
    assert found.stdout.strip() == str(app / "backend" / "__main__.py")  # `-m backend` finds the copied package

    # The install step, run in that layout with a stand-in for the image's python3: the server's requirements
    # go on top of the image, and a pip that replaced the image's torch (or vLLM) fails the build.
    (shell,) = [json_list for keyword, json_list in instructions if keyword == "SHELL"]
    (install,) = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python3").write_text(FAKE_PYTHON3)
    (fake_bin / "python3").chmod(0o755)
    log = tmp_path / "python3.log"

    def build(**extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*json.loads(shell), install], cwd=app, capture_output=True, text=True, check=False,
                              env={"PATH": f"{fake_bin}:/usr/bin:/bin", "FAKE_LOG": str(log), **extra})

    built = build()
    assert built.returncode == 0, built.stderr
    pip_calls = [line for line in log.read_text().splitlines() if line.startswith("-m pip")]
    assert pip_calls == ["-m pip install --no-cache-dir -r requirements-vllm.txt"]
    assert "torch 2.9.0+cu129 vllm 0.33.0" in built.stdout and "transformers" in built.stdout
    replaced = build(FAKE_PIP_REPLACES_TORCH="1")
    assert replaced.returncode != 0
    assert "changed torch 2.9.0+cu129 vllm 0.33.0 into torch 2.99.0 vllm 0.33.0" in replaced.stderr
