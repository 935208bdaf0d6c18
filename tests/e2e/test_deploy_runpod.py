"""deploy_runpod.sh for real: a temporary folder stands in for the pod's /workspace volume, a stand-in
`nvidia-smi` on PATH reports the GPU(s), and the tiny model is served (as a hub id already in the volume's cache).

ENGINE=vllm cannot install or run vLLM here: its setup runs against a stand-in Python that records the pip
commands, and its start against a stand-in venv that records the server's settings and then serves the tiny
model on the transformers engine."""

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


def fake_nvidia_smi(folder, total_mib: int, used_mib: int = 0, gpus: int = 1):
    """A stand-in nvidia-smi answering the queries the script makes, with `gpus` identical GPUs."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "nvidia-smi"
    tool.write_text(
        "#!/usr/bin/env bash\n"
        f"count={gpus}\n"
        'case "$*" in *--id=*) count=1 ;; esac  # --id=N: that one GPU\n'
        "for i in $(seq 0 $((count - 1))); do\n"
        '  case "$*" in\n'
        f'    *name,memory.total,memory.used*) echo "NVIDIA A100 80GB PCIe, {total_mib}, {used_mib}" ;;\n'
        f'    *memory.used,memory.total*) echo "{used_mib}, {total_mib}" ;;\n'
        '    -L) echo "GPU $i: NVIDIA A100 80GB PCIe (UUID: GPU-0000000$i)" ;;\n'
        '    *) echo "stand-in nvidia-smi"; break ;;\n'
        "  esac\n"
        "done\n"
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
    env = {name: value for name, value in env.items() if value is not None}  # None: leave the variable unset
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
    assert "starting the server: ENGINE=auto, TENSOR_PARALLEL_SIZE=1, WARMUP=1" in first.stdout  # pod defaults
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


# A Python to build venvs from whose venvs' python logs its arguments instead of running pip.
FAKE_BASE_PYTHON = """#!/usr/bin/env bash
if [[ "$1 $2" == "-m venv" ]]; then
  mkdir -p "$3/bin"
  printf '#!/usr/bin/env bash\\necho "$*" >>"$FAKE_LOG"\\n' >"$3/bin/python"
  chmod +x "$3/bin/python"
fi
"""


def test_engine_vllm_setup_installs_vllm_then_its_requirements_once(tmp_path):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / ".env").write_text("ENGINE=vllm\n")  # read from the volume's .env, as the other settings are
    base_python = tmp_path / "python3"
    base_python.write_text(FAKE_BASE_PYTHON)
    base_python.chmod(0o755)
    log = tmp_path / "pip.log"
    # No nvidia-smi on PATH: a pod's setup still installs the GPU build of vLLM, not the CPU one.
    setup = run(workspace, tmp_path / "no-gpu", "setup", VENV=None, PYTHON=str(base_python), FAKE_LOG=str(log),
                PATH="/usr/bin:/bin")
    assert setup.returncode == 0, setup.stdout + setup.stderr
    venv = workspace / "venv-vllm"
    assert f"setting up {venv} (engine: vllm)" in setup.stdout
    pip = [line.split() for line in log.read_text().splitlines() if line.startswith("-m pip")]
    installs = [words[words.index("install") + 1:] for words in pip if "install" in words]
    assert installs == [["vllm"], ["-r", str(ROOT / "requirements-vllm.txt")]]  # vLLM first: it brings its torch
    assert list(venv.glob(".installed-*")), "no marker file: a second setup would install again"
    assert not (workspace / "venv").exists()  # the transformers engine's venv is not touched

    again = run(workspace, tmp_path / "no-gpu", "setup", VENV=None, PYTHON=str(base_python), FAKE_LOG=str(log),
                PATH="/usr/bin:/bin")
    assert again.returncode == 0, again.stderr
    assert [line.split() for line in log.read_text().splitlines() if line.startswith("-m pip")] == pip


def test_tensor_parallel_start_counts_the_gpus_and_runs_the_server_on_vllm(pod, tmp_path):
    workspace, _, port = pod
    one_gpu = fake_nvidia_smi(tmp_path / "one-gpu", total_mib=81920, gpus=1)
    refused = run(workspace, one_gpu, VENV=None, TENSOR_PARALLEL_SIZE="2")  # the whole deploy: refused first
    assert refused.returncode == 1
    assert "TENSOR_PARALLEL_SIZE=2 splits the model across 2 GPUs, but nvidia-smi -L lists 1" in refused.stderr
    assert "--gpu-count 2" in refused.stderr and "setting up" not in refused.stdout
    assert not (workspace / "shizhen" / "server.pid").exists()
    transformers = run(workspace, one_gpu, "start", ENGINE="transformers", TENSOR_PARALLEL_SIZE="2")
    assert transformers.returncode == 1 and "TENSOR_PARALLEL_SIZE=2 needs ENGINE=vllm" in transformers.stderr
    bogus = run(workspace, one_gpu, "start", ENGINE="tensorrt")
    assert bogus.returncode == 1 and "ENGINE=tensorrt is not an engine" in bogus.stderr

    # Two GPUs: the count passes, and the server starts from the vLLM venv with ENGINE=vllm. That venv here
    # records the server's settings, then serves the tiny model on the transformers engine.
    venv_bin = workspace / "venv-vllm" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "$*" == "-m backend" ]]; then\n'
        '  env | grep -E "^(ENGINE|TENSOR_PARALLEL_SIZE|WARMUP)=" | sort >"$WORKSPACE/server-settings"\n'
        "  export ENGINE=transformers TENSOR_PARALLEL_SIZE=1\n"
        "fi\n"
        f'exec {ROOT / ".venv" / "bin" / "python"} "$@"\n'
    )
    (venv_bin / "python").chmod(0o755)
    two_gpus = fake_nvidia_smi(tmp_path / "two-gpus", total_mib=81920, gpus=2)
    started = run(workspace, two_gpus, "start", VENV=None, TENSOR_PARALLEL_SIZE="2")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "ENGINE=auto with TENSOR_PARALLEL_SIZE=2: using vllm" in started.stdout
    assert "the model is split across 2 of the 2 GPUs" in started.stdout
    assert (workspace / "server-settings").read_text().split() == ["ENGINE=vllm", "TENSOR_PARALLEL_SIZE=2", "WARMUP=1"]
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["status"] == "ready"
