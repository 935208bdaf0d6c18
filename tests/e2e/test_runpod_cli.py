"""`scripts/runpod.py` as the user runs it (a subprocess), against the fake RunPod v2 API on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.fake_runpod import CATALOG, FakeRunPod, FakeRunPodServer

SCRIPT = ROOT / "scripts" / "runpod.py"
REPO = "https://github.com/example/shizhen-server.git"
SXM, PCIE, H100 = "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "NVIDIA H100 80GB HBM3"


@pytest.fixture
def fake():
    with FakeRunPodServer(FakeRunPod()) as running:
        yield running


@pytest.fixture
def cli(fake, tmp_path):
    """Run the CLI in an empty folder (no .env) with the fake's URLs and key; returns CompletedProcess."""

    def run(*args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "API_KEY", "HF_TOKEN"))}
        clean.update(RUNPOD_API_KEY=fake.api_key, RUNPOD_API_URL=f"{fake.url}/v2",
                     RUNPOD_PROXY_URL=f"{fake.url}/proxy/{{pod_id}}-{{port}}")
        clean.update(env)
        return subprocess.run([sys.executable, str(SCRIPT), *args], input=stdin, capture_output=True, text=True,
                              env={k: v for k, v in clean.items() if v is not None}, cwd=tmp_path, timeout=120,
                              check=False)

    return run


def test_create_falls_back_to_the_next_gpu_when_one_has_no_capacity(fake, cli):
    result = cli("create", "--repo", REPO)
    assert result.returncode == 0, result.stderr
    assert f"no capacity for {PCIE} in the SECURE cloud; trying {SXM}" in result.stderr
    posts = fake.api_calls("POST", "/v2/pods")
    assert [p.body["gpu"]["id"] for p in posts] == [PCIE, SXM]
    body = posts[-1].body
    assert posts[-1].headers["authorization"] == f"Bearer {fake.api_key}"
    assert body["cloud"] == "SECURE" and body["gpu"]["count"] == 1 and body["disk"] == 40
    assert body["ports"] == ["8000/http", "22/tcp"]
    assert body["mounts"] == {"persistent": {"size": 100, "path": "/workspace"}}
    assert body["env"]["MODEL_ID"] == "FreedomIntelligence/ShizhenGPT-32B-VL"
    assert body["env"]["HF_HOME"] == "/workspace/models" and body["env"]["SHIZHEN_REPO"] == REPO
    assert "./deploy_runpod.sh" in body["args"] and "sleep infinity" in body["args"]
    (pod_id,) = fake.pods
    assert f"created pod {pod_id} (shizhengpt) on {SXM}, SECURE cloud, status PROVISIONING" in result.stdout
    assert "cost: $1.74/h" in result.stdout and f"{fake.url}/proxy/{pod_id}-8000" in result.stdout
    # The server's key was generated, put in the pod's env, and shown to the user once.
    key = body["env"]["API_KEY"]
    assert key.startswith("sk-") and len(key) > 40 and result.stdout.count(key) == 1


def test_create_reports_no_capacity_anywhere_with_what_to_do(fake, cli):
    fake.no_capacity |= {(SXM, "SECURE"), (H100, "SECURE")}
    result = cli("create", "--repo", REPO)
    assert result.returncode == 3 and not fake.pods
    assert len(fake.api_calls("POST", "/v2/pods")) == 3
    assert "has free capacity in the SECURE cloud right now" in result.stderr and "--cloud COMMUNITY" in result.stderr


def test_create_on_community_cloud_with_a_network_volume_and_a_given_key(fake, cli):
    result = cli("create", "--repo", REPO, "--cloud", "COMMUNITY", "--gpu", PCIE, "--network-volume", "vol42",
                 "--server-key", "sk-mine-0123456789abcdef", "--volume", "150", "--name", "tcm", "--hf-token", "hf_x1",
                 "--wait", "--interval", "0.05")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().splitlines()[-1].startswith("  web chat: ")  # --wait went on until ready
    body = fake.api_calls("POST", "/v2/pods")[0].body
    assert body["cloud"] == "COMMUNITY" and body["name"] == "tcm"
    assert body["mounts"] == {"network": [{"volumeId": "vol42", "path": "/workspace"}]}
    assert body["env"]["API_KEY"] == "sk-mine-0123456789abcdef" and body["env"]["HF_TOKEN"] == "hf_x1"
    assert "cost: $1.19/h" in result.stdout and "generated" not in result.stdout


def test_plan_prints_the_v2_requests_with_secrets_redacted_and_sends_nothing(fake, cli):
    result = cli("create", "--plan", "--repo", REPO, "--server-key", "sk-secret-server-key-123", "--hf-token",
                 "hf_secret_token_value_9")
    assert result.returncode == 0, result.stderr
    assert fake.requests == []
    out = result.stdout
    assert out.startswith(f"POST {fake.url}/v2/pods\n") and "Content-Type: application/json" in out
    assert fake.api_key not in out and "Bearer <redacted …cdef>" in out
    assert "sk-secret-server-key-123" not in out and "hf_secret_token_value_9" not in out
    body = json.loads(out[out.index("{"): out.index("\n}\n") + 2])
    assert body["gpu"] == {"id": PCIE, "count": 1} and body["env"]["API_KEY"] == "<redacted …-123>"
    assert f"gpu.id = '{SXM}'" in out and f"gpu.id = '{H100}'" in out  # the fallbacks, not sent
    # Works without any key, and on every command.
    assert cli("create", "--plan", RUNPOD_API_KEY=None).returncode == 0
    for command in (["status"], ["stop", "pod1"], ["start", "pod1"], ["terminate", "pod1"], ["cost"], ["wait", "p"]):
        planned = cli("--plan", *command)
        assert planned.returncode == 0 and planned.stdout.split()[0] in ("GET", "POST"), planned.stdout
    assert cli("cost", "--plan").stdout.startswith(f"GET {fake.url}/v2/catalog/gpus?include=AVAILABILITY&product=POD")
    assert fake.requests == []


def test_status_then_wait_until_the_server_is_ready_through_the_proxy(fake, cli, tmp_path):
    assert cli("create", "--repo", REPO).returncode == 0
    (pod_id,) = fake.pods
    (tmp_path / ".env").write_text(f"RUNPOD_API_KEY='{fake.api_key}'\n")  # the key from .env works too
    status = cli("status", RUNPOD_API_KEY=None)
    assert status.returncode == 0, status.stderr
    header, row = status.stdout.splitlines()
    assert header.split() == ["ID", "NAME", "STATUS", "GPU", "$/H", "UPTIME", "URL"]
    assert row.split()[:3] == [pod_id, "shizhengpt", "STARTING"] and "A100 SXM" in row and "1.74" in row

    waited = cli("wait", pod_id, "--interval", "0.05")
    assert waited.returncode == 0, waited.stderr
    lines = waited.stdout.splitlines()
    assert lines[0] == f"pod {pod_id}: RUNNING"
    proxy = f"{fake.url}/proxy/{pod_id}-8000"
    assert f"{proxy}/health: HTTP 502 (the proxy answers this until the server listens)" in lines
    assert f"{proxy}/health: loading" in lines and f"ready: {proxy}" in lines
    running = cli("status", pod_id).stdout.splitlines()[1]
    assert " RUNNING " in running and proxy in running and "0m " in running  # uptime from lastStartedAt


def test_wait_ends_on_a_model_that_failed_to_load_or_a_stopped_pod(fake, cli):
    pod = fake.add_pod("RUNNING")
    fake.health_script = [(503, {"status": "error", "error": "CUDA out of memory"})]
    failed = cli("wait", pod["id"], "--interval", "0.05")
    assert failed.returncode == 1 and "the model failed to load: CUDA out of memory" in failed.stderr
    exited = fake.add_pod("EXITED")
    stopped = cli("wait", exited["id"], "--interval", "0.05")
    assert stopped.returncode == 1 and "the pod is EXITED" in stopped.stderr
    slow = fake.add_pod("RUNNING")
    fake.health_script = [(502, "<html>502</html>")]
    late = cli("wait", slow["id"], "--interval", "0.05", "--timeout", "0.3")
    assert late.returncode == 1 and "not ready after 0.3 s (last: HTTP 502)" in late.stderr


def test_stop_start_and_actions_in_the_wrong_state(fake, cli):
    pod_id = fake.add_pod("RUNNING")["id"]
    stopped = cli("stop", pod_id)
    assert stopped.returncode == 0 and "the volume (model cache, venv, code) stays" in stopped.stdout
    assert fake.pods[pod_id]["status"] == "EXITED"
    again = cli("stop", pod_id)
    assert again.returncode == 1 and "failed (409)" in again.stderr
    assert "Cannot stop a pod that is EXITED" in again.stderr and "not valid in the pod's current state" in again.stderr
    started = cli("start", pod_id)
    assert started.returncode == 0 and "finds the model on the volume" in started.stdout
    assert fake.pods[pod_id]["status"] == "STARTING"
    assert cli("stop", pod_id).returncode == 0
    fake.host_busy.add(pod_id)
    busy = cli("start", pod_id)
    assert busy.returncode == 1 and "no free GPU to resume on" in busy.stderr and "network volume" in busy.stderr
    assert fake.api_calls("POST", f"/v2/pods/{pod_id}/action")[0].body == {"action": "stop"}


def test_terminate_asks_unless_yes(fake, cli):
    first, second = fake.add_pod("RUNNING")["id"], fake.add_pod("EXITED")["id"]
    declined = cli("terminate", first, stdin="n\n")
    assert declined.returncode == 1 and "not terminated" in declined.stdout and first in fake.pods
    assert "volume, with the cached model, is deleted" in declined.stdout
    assert cli("terminate", first, stdin="").returncode == 1 and first in fake.pods  # no answer is no
    confirmed = cli("terminate", first, stdin="y\n")
    assert confirmed.returncode == 0 and first not in fake.pods
    assert cli("terminate", second, "--yes").returncode == 0 and not fake.pods
    gone = cli("status", first)
    assert gone.returncode == 1 and "No such pod" in gone.stderr and "(404)" in gone.stderr


def test_errors_are_explained(fake, cli):
    bad_key = cli("status", RUNPOD_API_KEY="rpa_wrong")
    assert bad_key.returncode == 1 and "(401)" in bad_key.stderr and "Check RUNPOD_API_KEY" in bad_key.stderr
    no_key = cli("status", RUNPOD_API_KEY=None)
    assert no_key.returncode == 1 and "RUNPOD_API_KEY is not set" in no_key.stderr and not fake.requests[1:]
    fake.balance = 0.5
    broke = cli("create", "--repo", REPO, "--gpu", SXM)
    assert broke.returncode == 1 and "(402)" in broke.stderr and "balance is too low" in broke.stderr
    no_repo = cli("create", GIT_DIR="/nonexistent")  # no --repo and no origin a pod could clone
    assert no_repo.returncode == 2 and "--repo" in no_repo.stderr and len(fake.api_calls("POST")) == 1
    invalid = cli("create", "--repo", REPO, "--gpu", SXM, "--disk", "0")
    assert invalid.returncode == 1 and "(422)" in invalid.stderr and "disk" in invalid.stderr


def test_rate_limits_are_waited_out_and_server_errors_retried_only_when_safe(fake, cli):
    fake.inject(429, Retry_After="1")
    listed = cli("status")
    assert listed.returncode == 0 and "RunPod answered 429; retrying in 1 s" in listed.stderr
    assert len(fake.api_calls("GET", "/v2/pods")) == 2
    fake.inject(429, Retry_After="0")
    created = cli("create", "--repo", REPO, "--gpu", SXM)
    assert created.returncode == 0 and len(fake.pods) == 1  # a 429 on create is safe to repeat
    fake.inject(503)
    assert cli("status").returncode == 0  # GET: retried after a backoff
    fake.inject(502, detail="upstream error")
    failed = cli("create", "--repo", REPO, "--gpu", SXM)
    assert failed.returncode == 1 and "(502)" in failed.stderr and "upstream error" in failed.stderr
    assert len(fake.pods) == 1  # a 5xx on create is not repeated: the first one may have made a pod
    fake.inject(429, times=4, Retry_After="0")
    exhausted = cli("status")
    assert exhausted.returncode == 1 and "kept rate-limiting" in exhausted.stderr


def test_cost_from_the_live_catalog_with_storage(fake, cli):
    result = cli("cost")
    assert result.returncode == 0, result.stderr
    (call,) = fake.api_calls("GET", "/v2/catalog/gpus")
    assert sorted(call.query.split("&")) == ["include=AVAILABILITY", "product=POD"]
    rows = {line.split("  ")[0]: line.split() for line in result.stdout.splitlines()[1:4]}
    # A100 PCIe, secure: $1.64/h + storage (100 GB volume and 40 GB disk at $0.10/GB-month) while running.
    assert rows[PCIE][-6:] == ["SECURE", "NONE", "1.64", "39.82", "1211", "417"]
    assert rows[SXM][-5:-3] == ["HIGH", "1.74"] and rows[H100][-4] == "2.99"
    assert "A stopped pod costs $20.00/month for its volume" in result.stdout
    community = cli("cost", "--cloud", "COMMUNITY", "--gpu", "NVIDIA A40", "--gpu", PCIE, "--volume", "0", "--disk", "0")
    a40, pcie = community.stdout.splitlines()[1:3]
    assert "not offered" in a40
    assert pcie.split()[-6:] == ["COMMUNITY", "HIGH", "1.19", "28.56", "869", "290"]
    assert set(CATALOG) >= {PCIE, SXM, H100}
