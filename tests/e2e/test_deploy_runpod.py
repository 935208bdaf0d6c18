"""deploy_runpod.sh for real: a temporary folder stands in for the pod's /workspace volume, a stand-in
`nvidia-smi` on PATH reports the GPU, and the tiny model is served (as a hub id already in the volume's cache)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import httpx
import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import free_port

SCRIPT = ROOT / "deploy_runpod.sh"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_nvidia_smi(folder, total_mib: int, used_mib: int = 0):
    """A stand-in nvidia-smi answering the queries the script makes."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "nvidia-smi"
    tool.write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in\n'
        f'  *name,memory.total,memory.used*) echo "NVIDIA A100 80GB PCIe, {total_mib}, {used_mib}" ;;\n'
        f'  *memory.used,memory.total*) echo "{used_mib}, {total_mib}" ;;\n'
        '  *) echo "stand-in nvidia-smi" ;;\n'
        "esac\n"
    )
    tool.chmod(0o755)
    return folder


def seed_hub_cache(workspace, model_dir, repo="FreedomIntelligence/ShizhenGPT-Tiny-VL"):
    """Lay the tiny checkpoint out as huggingface_hub caches a download (blobs, snapshot, refs/main)."""
    base = workspace / "models" / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = base / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in model_dir.iterdir():
        shutil.copy(file, snapshot / file.name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(COMMIT)
    return repo


def run(workspace, gpu_bin, *args, **env_overrides):
    env = {
        "PATH": f"{gpu_bin}:{os.environ['PATH']}",
        "HOME": str(workspace),
        "WORKSPACE": str(workspace),
        "VENV": str(ROOT / ".venv"),  # the test run's own venv stands in for the one on the volume
        "HF_HUB_OFFLINE": "1",
        "START_TIMEOUT": "180",
        "SHUTDOWN_GRACE_SECONDS": "5",
        **env_overrides,
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600, cwd=workspace
    )


@pytest.fixture
def pod(tmp_path, tiny_vl_dir):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    repo = seed_hub_cache(workspace, tiny_vl_dir)
    port = free_port()
    (workspace / ".env").write_text(f"MODEL_ID={repo}\nSERVED_MODEL_NAME=tiny\nHOST=127.0.0.1\nPORT={port}\n")
    gpu = fake_nvidia_smi(tmp_path / "bin", total_mib=81920, used_mib=1024)
    yield workspace, gpu, port
    run(workspace, gpu, "stop")


def test_start_status_stop_and_a_second_start_from_the_cache(pod):
    workspace, gpu, port = pod
    first = run(workspace, gpu, RUNPOD_POD_ID="abc123")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "is already in the cache" in first.stdout and "verified:" in first.stdout
    assert "GPU: NVIDIA A100 80GB PCIe with 80 GB, 79 GB free" in first.stdout
    assert "https://abc123-%d.proxy.runpod.net" % port in first.stdout
    assert "curl https://abc123" in first.stdout and "WARNING: API_KEY is not set" in first.stdout
    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
    assert health["status"] == "ready" and health["resolved_revision"] == COMMIT
    assert (workspace / "shizhen" / "server.pid").is_file() and (workspace / "shizhen" / "server.log").is_file()

    status = run(workspace, gpu, "status")
    assert "process: running" in status.stdout and '"status":"ready"' in status.stdout
    assert "GPU memory (MiB used / total): 1024, 81920" in status.stdout

    assert "already running" in run(workspace, gpu, "start").stdout
    refused = run(workspace, gpu, "restart", HOST="0.0.0.0")  # no API_KEY: refused before stopping anything
    assert refused.returncode == 1 and "API_KEY is not set" in refused.stderr and "stopping" not in refused.stdout
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["status"] == "ready"
    stopped = run(workspace, gpu, "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=3)
    assert "process: not running" in run(workspace, gpu, "status").stdout

    again = run(workspace, gpu, "download")
    assert again.returncode == 0 and "is already in the cache" in again.stdout  # no download: the volume has it
    restarted = run(workspace, gpu, "start")
    assert restarted.returncode == 0, restarted.stderr
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["status"] == "ready"
    logs = run(workspace, gpu, "logs")
    assert logs.returncode == 0 and logs.stdout.count("Uvicorn running on") == 2  # both starts, one log on the volume


def test_checks_refuse_before_spending_an_hour(pod, tmp_path):
    workspace, gpu, port = pod
    small_gpu = fake_nvidia_smi(tmp_path / "small-bin", total_mib=24576, used_mib=0)
    result = run(workspace, small_gpu, "start", MODEL_VRAM_GB="70")
    assert result.returncode == 1
    assert "the GPU has 24 GB free; FreedomIntelligence/ShizhenGPT-Tiny-VL needs about 70 GB" in result.stderr
    assert "What to do:" in result.stderr

    no_gpu = run(workspace, tmp_path / "empty-bin", "start", PATH="/usr/bin:/bin")
    assert no_gpu.returncode == 1 and "no GPU" in no_gpu.stderr

    outside = run(workspace, gpu, "download", HF_HOME=str(tmp_path / "container-disk"))
    assert outside.returncode == 1 and "is not on the volume" in outside.stderr

    too_big = run(workspace, gpu, "download", MODEL_DISK_GB="100000")
    assert too_big.returncode == 1 and "GB free; the model needs 100000 GB" in too_big.stderr

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        taken = run(workspace, gpu, "start")
    assert taken.returncode == 1 and f"port {port} is already in use" in taken.stderr

    assert run(workspace, gpu, "bogus").returncode == 2


def test_a_public_address_without_a_key_is_refused_unless_the_operator_allows_it(pod, tmp_path):
    workspace, gpu, _ = pod
    for command, host, allow in (([], "0.0.0.0", None), (["start"], "0.0.0.0", "0"), (["start"], "::", None)):
        refused = run(workspace, gpu, *command, HOST=host, **({"ALLOW_NO_API_KEY": allow} if allow else {}))
        assert refused.returncode == 1, refused.stdout
        assert f"API_KEY is not set and the server would listen on {host}" in refused.stderr
        assert "ALLOW_NO_API_KEY=1" in refused.stderr and "What to do:" in refused.stderr
        assert "setting up" not in refused.stdout and "GPU:" not in refused.stdout  # before setup, download, start
        assert not (workspace / "shizhen" / "server.pid").exists()

    # With a key, or with the explicit opt-in, start goes on to its other checks (a small card fails the next one).
    small_gpu = fake_nvidia_smi(tmp_path / "small-bin", total_mib=24576)
    allowed = run(workspace, small_gpu, "start", HOST="0.0.0.0", ALLOW_NO_API_KEY="1", MODEL_VRAM_GB="70")
    assert allowed.returncode == 1 and "the GPU has 24 GB free" in allowed.stderr
    assert "WARNING: API_KEY is not set and ALLOW_NO_API_KEY=1: anyone who reaches 0.0.0.0" in allowed.stdout
    keyed = run(workspace, small_gpu, "start", HOST="0.0.0.0", API_KEY="sk-test-key", MODEL_VRAM_GB="70")
    assert keyed.returncode == 1 and "the GPU has 24 GB free" in keyed.stderr and "API_KEY" not in keyed.stdout

    shown = run(workspace, gpu, "help")
    assert shown.returncode == 0 and "ALLOW_NO_API_KEY=1" in shown.stdout and "./deploy_runpod.sh start" in shown.stdout
