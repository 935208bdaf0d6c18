"""`scripts/runpod.py` as the user runs it (a subprocess), against the fake RunPod v2 API on loopback."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

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


def cli_environment(fake, **env: str | None) -> dict[str, str]:
    """The test run's environment without the user's RunPod settings and secrets, pointed at the fake."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("RUNPOD_", "API_KEY", "HF_TOKEN", "SHIZHEN_", "ALLOW_NO_API_KEY"))}
    clean.update(RUNPOD_API_KEY=fake.api_key, RUNPOD_API_URL=f"{fake.url}/v2",
                 RUNPOD_PROXY_URL=f"{fake.url}/proxy/{{pod_id}}-{{port}}")
    clean.update(env)
    return {k: v for k, v in clean.items() if v is not None}


@pytest.fixture
def cli(fake, tmp_path):
    """Run the CLI in an empty folder (no .env) with the fake's URLs and key; returns CompletedProcess."""

    def run(*args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPT), *args], input=stdin, capture_output=True, text=True,
                              env=cli_environment(fake, **env), cwd=tmp_path, timeout=120, check=False)

    return run


def on_a_terminal(fake, cwd: Path, *args: str, typed: str) -> tuple[int, str, str, str]:
    """Run the CLI as from a terminal and type `typed` and Enter at its first hidden prompt.

    The CLI gets a pseudo-terminal as stdin and as its controlling terminal (/dev/tty, where getpass prompts),
    as in an interactive shell. Returns the exit status, stdout, stderr and everything the terminal showed.
    """
    master, slave = os.openpty()
    # A new session has no controlling terminal; the first terminal a session leader opens becomes it.
    takes_the_terminal = ("import os, sys; fd = os.open(sys.argv[1], os.O_RDWR); os.dup2(fd, 0); "
                          "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")
    process = subprocess.Popen([sys.executable, "-c", takes_the_terminal, os.ttyname(slave), str(SCRIPT), *args],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=cli_environment(fake), cwd=cwd, start_new_session=True)
    shown = b""
    deadline = time.monotonic() + 60
    # The slave end stays open here until the end: with no process holding it, reading the master fails (EIO).
    try:
        while b": " not in shown:  # the prompt, written once echo is off
            ready, _, _ = select.select([master], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                process.kill()
                pytest.fail(f"no prompt on the terminal; it shows {shown!r}; stderr: {process.communicate()[1]}")
            shown += os.read(master, 4096)
        os.write(master, typed.encode() + b"\n")
        out, err = process.communicate(timeout=120)
        while select.select([master], [], [], 0.2)[0]:
            shown += os.read(master, 4096)
    finally:
        os.close(master)
        os.close(slave)
    return process.returncode, out, err, shown.decode(errors="replace")


def git_dir_with_origin(tmp_path: Path, url: str) -> str:
    """A repository elsewhere whose `origin` is url; GIT_DIR=it makes the CLI read that origin."""
    git_dir = tmp_path / f"origin-{len(list(tmp_path.glob('origin-*')))}.git"
    subprocess.run(["git", "init", "-q", "--bare", str(git_dir)], check=True)
    subprocess.run(["git", "--git-dir", str(git_dir), "config", "remote.origin.url", url], check=True)
    return str(git_dir)


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


def test_create_with_several_gpus_serves_on_vllm_with_tensor_parallelism(fake, cli):
    result = cli("create", "--repo", REPO, "--gpu", SXM, "--gpu-count", "2")
    assert result.returncode == 0, result.stderr
    body = fake.api_calls("POST", "/v2/pods")[-1].body
    assert body["gpu"] == {"id": SXM, "count": 2}
    assert body["env"]["ENGINE"] == "vllm" and body["env"]["TENSOR_PARALLEL_SIZE"] == "2"
    assert "--gpu-count 2: ENGINE=vllm with TENSOR_PARALLEL_SIZE=2" in result.stderr
    assert "cost: $3.48/h" in result.stdout  # two GPUs' price

    layers = cli("create", "--repo", REPO, "--gpu", SXM, "--gpu-count", "2", "--engine", "transformers")
    assert layers.returncode == 0, layers.stderr
    env = fake.api_calls("POST", "/v2/pods")[-1].body["env"]
    assert env["ENGINE"] == "transformers" and "TENSOR_PARALLEL_SIZE" not in env
    assert "no tensor parallelism" in layers.stderr
    single = cli("create", "--repo", REPO, "--gpu", SXM, "--engine", "vllm")
    assert single.returncode == 0 and "ENGINE=vllm" not in single.stderr
    assert fake.api_calls("POST", "/v2/pods")[-1].body["env"]["ENGINE"] == "vllm"

    posts = len(fake.api_calls("POST", "/v2/pods"))
    refused = cli("create", "--repo", REPO, "--gpu-count", "0")
    assert refused.returncode == 2 and "is not a number of GPUs" in refused.stderr
    assert len(fake.api_calls("POST", "/v2/pods")) == posts  # refused before any request


def test_create_reports_no_capacity_anywhere_with_what_to_do(fake, cli):
    fake.no_capacity |= {(SXM, "SECURE"), (H100, "SECURE")}
    result = cli("create", "--repo", REPO)
    assert result.returncode == 3 and not fake.pods
    assert len(fake.api_calls("POST", "/v2/pods")) == 3
    assert "has free capacity in the SECURE cloud right now" in result.stderr and "--cloud COMMUNITY" in result.stderr


def test_create_on_community_cloud_with_a_network_volume_and_the_keys_from_dotenv(fake, cli, tmp_path):
    (tmp_path / ".env").write_text("API_KEY=sk-mine-0123456789abcdef\nHF_TOKEN='hf_x1'\n")
    result = cli("create", "--repo", REPO, "--cloud", "COMMUNITY", "--gpu", PCIE, "--network-volume", "vol42",
                 "--volume", "150", "--name", "tcm", "--wait", "--interval", "0.05")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().splitlines()[-1].startswith("  web chat: ")  # --wait went on until ready
    body = fake.api_calls("POST", "/v2/pods")[0].body
    assert body["cloud"] == "COMMUNITY" and body["name"] == "tcm"
    assert body["mounts"] == {"network": [{"volumeId": "vol42", "path": "/workspace"}]}
    assert body["env"]["API_KEY"] == "sk-mine-0123456789abcdef" and body["env"]["HF_TOKEN"] == "hf_x1"
    assert "cost: $1.19/h" in result.stdout and "generated" not in result.stdout
    assert "HF_TOKEN from your environment or .env goes into the pod's environment" in result.stderr


def test_create_takes_the_secrets_from_the_environment_and_no_process_shows_them(fake, cli):
    key, token = "sk-only-in-the-environment-0123456789", "hf_only_in_the_environment_42"
    command_lines: list[str] = []

    def read_the_process_list(body):
        # What `ps -ef` shows every user, read while the CLI waits for this answer.
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                command_lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:  # a process that ended meanwhile
                pass

    fake.on_create = read_the_process_list
    result = cli("create", "--repo", REPO, "--gpu", SXM, API_KEY=key, HF_TOKEN=token)
    assert result.returncode == 0, result.stderr
    env = fake.api_calls("POST", "/v2/pods")[0].body["env"]
    assert env["API_KEY"] == key and env["HF_TOKEN"] == token
    assert any(f"{SCRIPT} create" in line for line in command_lines)  # the CLI was running, and seen
    assert [line for line in command_lines if key in line or token in line] == []
    assert key not in result.stdout + result.stderr and token not in result.stdout + result.stderr
    assert "generated" not in result.stdout


def test_secrets_on_the_command_line_are_refused_loudly_without_repeating_them(fake, cli):
    for option, variable in (("--server-key", "API_KEY"), ("--hf-token", "HF_TOKEN")):
        for words in ([option, "s3cret-value-xyz"], [f"{option}=s3cret-value-xyz"], ["--plan", option, "x"]):
            result = cli("create", "--repo", REPO, *words)
            assert result.returncode == 2, (words, result.stdout)
            assert f"{option} was removed" in result.stderr and "process list" in result.stderr
            assert f"Set {variable} in the environment or in .env instead" in result.stderr
            assert "s3cret-value-xyz" not in result.stdout + result.stderr
    assert "--ask-hf-token" in cli("create", "--hf-token", "hf_x").stderr
    assert fake.requests == []


def test_hf_token_is_asked_for_only_when_told_and_read_from_a_pipe(fake, cli):
    piped = cli("create", "--repo", REPO, "--gpu", SXM, "--ask-hf-token", stdin="hf_piped_token_2\n",
                HF_TOKEN="hf_env_token_1")
    assert piped.returncode == 0, piped.stderr
    assert fake.api_calls("POST", "/v2/pods")[-1].body["env"]["HF_TOKEN"] == "hf_piped_token_2"
    assert "hf_piped_token_2" not in piped.stdout + piped.stderr
    nothing = cli("create", "--repo", REPO, "--gpu", SXM, "--ask-hf-token", stdin="")
    assert nothing.returncode == 1 and "no token was entered" in nothing.stderr and len(fake.pods) == 1
    without = cli("create", "--repo", REPO, "--gpu", SXM)
    assert without.returncode == 0 and "HF_TOKEN" not in fake.api_calls("POST", "/v2/pods")[-1].body["env"]
    assert "HF_TOKEN" not in without.stderr


def test_on_a_terminal_the_server_key_is_asked_for_without_echo(fake, tmp_path):
    typed = "sk-typed-at-the-prompt-0123456789"
    status, out, err, shown = on_a_terminal(fake, tmp_path, "create", "--repo", REPO, "--gpu", SXM, typed=typed)
    assert status == 0, err
    assert "The server's API key (API_KEY is not set; press Enter to generate one): " in shown
    assert typed not in shown and typed not in out + err  # getpass turned the echo off
    assert fake.api_calls("POST", "/v2/pods")[-1].body["env"]["API_KEY"] == typed
    assert "generated" not in out

    status, out, err, shown = on_a_terminal(fake, tmp_path, "create", "--repo", REPO, "--gpu", SXM, typed="")
    assert status == 0, err
    generated = fake.api_calls("POST", "/v2/pods")[-1].body["env"]["API_KEY"]
    assert generated.startswith("sk-") and generated != typed
    assert out.count(generated) == 1 and "generated now and shown only once" in out


def test_an_origin_carrying_a_token_is_not_copied_to_the_pod_unasked(fake, cli, tmp_path):
    with_token = "https://me:ghp_origin_secret_99@github.com/me/shizhen-server.git"
    shown = "https://<redacted>@github.com/me/shizhen-server.git"
    origin = git_dir_with_origin(tmp_path, with_token)
    for plan in ([], ["--plan"]):
        refused = cli("create", *plan, GIT_DIR=origin)
        assert refused.returncode == 2, refused.stdout
        assert f"the `origin` remote carries credentials ({shown})" in refused.stderr
        assert "--repo URL (or set SHIZHEN_REPO)" in refused.stderr and ".git/config" in refused.stderr
        assert "ghp_origin_secret_99" not in refused.stdout + refused.stderr
    assert fake.requests == []

    # Given explicitly, it is used, with a warning that says where the token goes.
    explicit = cli("create", "--gpu", SXM, "--repo", with_token, GIT_DIR=origin)
    assert explicit.returncode == 0, explicit.stderr
    assert f"WARNING: the repository URL carries credentials ({shown})" in explicit.stderr
    assert "pod's environment" in explicit.stderr and "/workspace/shizhen-server/.git/config" in explicit.stderr
    assert "ghp_origin_secret_99" not in explicit.stdout + explicit.stderr
    assert fake.api_calls("POST", "/v2/pods")[-1].body["env"]["SHIZHEN_REPO"] == with_token
    (tmp_path / ".env").write_text(f"SHIZHEN_REPO={with_token}\n")
    from_dotenv = cli("create", "--gpu", SXM, GIT_DIR=origin)
    assert from_dotenv.returncode == 0 and "WARNING: the repository URL carries credentials" in from_dotenv.stderr
    (tmp_path / ".env").unlink()

    # An origin without a secret (ssh, or https without a user) is used as before, silently.
    for plain in ("git@github.com:me/shizhen-server.git", "https://github.com/me/shizhen-server.git"):
        used = cli("create", "--gpu", SXM, GIT_DIR=git_dir_with_origin(tmp_path, plain))
        assert used.returncode == 0 and "WARNING" not in used.stderr, used.stderr
        assert fake.api_calls("POST", "/v2/pods")[-1].body["env"]["SHIZHEN_REPO"] == plain


def test_plan_prints_the_v2_requests_with_secrets_redacted_and_sends_nothing(fake, cli):
    result = cli("create", "--plan", "--repo", REPO, API_KEY="sk-secret-server-key-123",
                 HF_TOKEN="hf_secret_token_value_9")
    assert result.returncode == 0, result.stderr
    assert fake.requests == []
    out = result.stdout
    assert out.startswith(f"POST {fake.url}/v2/pods\n") and "Content-Type: application/json" in out
    assert fake.api_key not in out and "Bearer <redacted …cdef>" in out
    assert "sk-secret-server-key-123" not in out and "hf_secret_token_value_9" not in out
    body = json.loads(out[out.index("{"): out.index("\n}\n") + 2])
    assert body["gpu"] == {"id": PCIE, "count": 1} and body["env"]["API_KEY"] == "<redacted …-123>"
    assert f"gpu.id = '{SXM}'" in out and f"gpu.id = '{H100}'" in out  # the fallbacks, not sent
    assert body["env"]["HF_TOKEN"] == "<redacted …ue_9>"
    asked = cli("create", "--plan", "--repo", REPO, "--ask-hf-token", stdin="hf_never_read_in_a_plan\n")
    assert '"HF_TOKEN": "<asked at creation>"' in asked.stdout
    assert '"API_KEY": "<generated at creation>"' in asked.stdout
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
    # The server hides the reason from callers without its key: `wait` sends API_KEY from the environment.
    fake.server_key = "sk-operator-key"
    keyed = cli("wait", pod["id"], "--interval", "0.05", API_KEY="sk-operator-key")
    assert keyed.returncode == 1 and "the model failed to load: CUDA out of memory" in keyed.stderr
    fake.server_key = ""
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
