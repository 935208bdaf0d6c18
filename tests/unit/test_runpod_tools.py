"""The laptop's RunPod tools, piece by piece: figures, tables, .env, redaction, retries on a dead network."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import runpod_api
import runpod_report


def test_monthly_costs_include_storage_running_and_stopped():
    cost = runpod_report.monthly_costs(1.64, volume_gb=100, disk_gb=40, prices=(0.10, 0.20, 0.10))
    storage_per_hour = (100 * 0.10 + 40 * 0.10) / 730
    assert cost["hour"] == pytest.approx(1.64 + storage_per_hour)
    assert cost["day"] == pytest.approx(24 * (1.64 + storage_per_hour))
    assert cost["month"] == pytest.approx(730 * 1.64 + 14.0)
    # 8 h/day: a third of the month running; the volume is billed at the stopped price the rest of the time.
    assert cost["month_8h"] == pytest.approx(1.64 * 730 / 3 + 40 * 0.10 / 3 + 100 * (0.10 / 3 + 0.20 * 2 / 3))
    assert cost["stopped_month"] == pytest.approx(20.0)


def test_pod_cost_and_uptime_in_the_shapes_the_api_uses():
    assert runpod_report.hourly_cost({"cost": 1.5}) == 1.5
    assert runpod_report.hourly_cost({"cost": {"perHour": "2.25"}}) == 2.25
    assert runpod_report.hourly_cost({"costPerHr": "0.74"}) == 0.74
    assert runpod_report.hourly_cost({}) is None
    now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    started = (now - timedelta(hours=26, minutes=5)).isoformat().replace("+00:00", "Z")
    assert runpod_report.uptime_seconds({"status": "RUNNING", "lastStartedAt": started}, now) == 26 * 3600 + 300
    assert runpod_report.uptime_seconds({"status": "RUNNING", "runtime": {"uptimeInSeconds": 42}}, now) == 42
    assert runpod_report.uptime_seconds({"status": "EXITED", "lastStartedAt": started}, now) is None
    assert [runpod_report.format_duration(s) for s in (None, 65, 3 * 3600 + 240, 26 * 3600)] == [
        "-", "1m 5s", "3h 4m", "1d 2h"]


def test_status_row_and_table():
    pod = {"id": "abc", "name": "tcm", "status": "EXITED", "gpu": {"id": "X", "count": 2, "displayName": "A100"},
           "cost": 3.28, "ports": ["8000/http"]}
    row = runpod_report.pod_row(pod, runpod_api.DEFAULT_PROXY_URL, datetime.now(UTC))
    assert row == ["abc", "tcm", "EXITED", "2x A100", "-", "-", "https://abc-8000.proxy.runpod.net"]
    running = runpod_report.pod_row({**pod, "status": "RUNNING"}, runpod_api.DEFAULT_PROXY_URL, datetime.now(UTC))
    assert running[4] == "3.28"
    assert runpod_report.pod_row({"id": "x", "ports": []}, "{pod_id}", datetime.now(UTC))[-1] == "-"
    table = runpod_report.format_table(["A", "LONG"], [["wide cell", "b"]])
    assert table.splitlines() == ["A          LONG", "wide cell  b"]


def test_catalog_prices_and_stock_in_either_shape():
    flat = {"id": "g", "securePrice": 1.64, "communityPrice": None, "stockStatus": "LOW"}
    nested = {"id": "g", "prices": {"SECURE": 2.0}, "availability": {"secure": {"stockStatus": "HIGH"}}}
    assert runpod_report.gpu_price(flat, "SECURE") == 1.64 and runpod_report.gpu_price(flat, "COMMUNITY") is None
    assert runpod_report.gpu_price(nested, "SECURE") == 2.0
    assert runpod_report.gpu_stock(flat, "SECURE") == "LOW" and runpod_report.gpu_stock(nested, "SECURE") == "HIGH"
    assert runpod_report.catalog_gpus({"gpus": [flat]}) == [flat] == runpod_report.catalog_gpus([flat])


def test_env_file_redaction_and_retry_after(tmp_path):
    env = tmp_path / ".env"
    env.write_text("# comment\nRUNPOD_API_KEY='rpa_abc'\nexport API_KEY=\"sk-1\"\nEMPTY=\nnot a line\n")
    assert runpod_api.read_env_file(env) == {"RUNPOD_API_KEY": "rpa_abc", "API_KEY": "sk-1", "EMPTY": ""}
    assert runpod_api.read_env_file(tmp_path / "missing") == {}
    assert runpod_api.redact("rpa_0123456789abcdefWXYZ") == "<redacted …WXYZ>"
    assert runpod_api.redact("short") == "<redacted>" and runpod_api.redact("") == "<not set>"
    env = {"API_KEY": "sk-0123456789abcdef", "MODEL_ID": "m", "SHIZHEN_REPO": "https://me:ghp_tok@github.com/me/s.git"}
    body = runpod_api.redact_body({"env": env, "name": "n"})
    assert body["name"] == "n" and body["env"] == {
        "API_KEY": "<redacted …cdef>", "MODEL_ID": "m", "SHIZHEN_REPO": "https://<redacted>@github.com/me/s.git"}
    request = httpx.Request("GET", "https://x")
    assert runpod_api.retry_after_seconds(httpx.Response(429, headers={"Retry-After": "7"}, request=request), 1) == 7
    assert runpod_api.retry_after_seconds(httpx.Response(429, headers={"Retry-After": "9999"}, request=request), 1) == 60
    date = httpx.Response(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, request=request)
    assert runpod_api.retry_after_seconds(date, 1) == 0  # a date in the past: retry now
    assert runpod_api.retry_after_seconds(httpx.Response(503, request=request), 4) == 4


def test_a_dead_network_is_retried_with_backoff_then_explained():
    with socket.socket() as probe:  # a port nothing listens on: connection refused, a real network failure
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    waits: list[float] = []
    client = runpod_api.RunPodClient("rpa_key", base_url=f"http://127.0.0.1:{port}/v2", sleep=waits.append)
    with pytest.raises(runpod_api.RunPodError, match="Could not reach RunPod .* tried 4 time"):
        client.get("/pods")
    assert waits == [1.0, 2.0, 4.0]
    waits.clear()
    with pytest.raises(runpod_api.RunPodError):  # the request never left: a create is safe to repeat too
        client.post("/pods", {"name": "x"})
    assert waits == [1.0, 2.0, 4.0]


def test_the_pods_start_command_is_one_clean_bash_script(tmp_path):
    import runpod

    args = runpod.build_parser().parse_args(["create", "--repo", "https://example.com/s.git"])
    words = shlex.split(runpod.pod_request(args, "NVIDIA A40", "sk-x", args.repo)["args"])
    assert words[:2] == ["bash", "-c"] and len(words) == 3
    script = tmp_path / "start.sh"
    script.write_text("#!/usr/bin/env bash\n" + words[2] + "\n")
    checked = subprocess.run([Path(sys.executable).parent / "shellcheck", script], capture_output=True, text=True,
                             check=False)
    assert checked.returncode == 0, checked.stdout


def test_which_git_urls_carry_a_secret():
    import runpod

    secret = ["https://me:ghp_x@github.com/me/s.git", "https://ghp_x@github.com/me/s.git", "http://u:p@host/r.git",
              "ssh://git:pw@host/r.git", "https://oauth2:glpat-x@gitlab.com/me/s.git"]
    plain = ["https://github.com/me/s.git", "git@github.com:me/s.git", "ssh://git@github.com/me/s.git", ""]
    assert [runpod.has_credentials(url) for url in secret] == [True] * len(secret)
    assert [runpod.has_credentials(url) for url in plain] == [False] * len(plain)
    assert runpod.redact_url(secret[0]) == "https://<redacted>@github.com/me/s.git"


def test_removed_secret_options_fail_in_the_parser_without_repeating_the_value(capsys):
    import runpod

    with pytest.raises(SystemExit) as exited:
        runpod.build_parser().parse_args(["create", "--server-key", "sk-do-not-echo"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--server-key was removed" in err and "Set API_KEY in the environment" in err and "sk-do-not-echo" not in err
    with pytest.raises(SystemExit):
        runpod.build_parser().parse_args(["create", "--help"])
    shown = capsys.readouterr().out
    assert "--ask-hf-token" in shown and "--server-key" not in shown and "--hf-token" not in shown


def test_an_answer_that_is_not_json_is_explained():
    def html_page(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>captive portal</html>")

    client = runpod_api.RunPodClient("rpa_key", base_url="https://wrong.example/v2")
    client._http = httpx.Client(transport=httpx.MockTransport(html_page))
    with pytest.raises(runpod_api.RunPodError, match="not JSON: '<html>captive portal</html>'. Is RUNPOD_API_URL"):
        client.get("/pods")


def test_several_gpus_mean_vllm_with_tensor_parallelism_unless_told_otherwise():
    import runpod

    def pod_env(*words: str) -> dict[str, str]:
        args = runpod.build_parser().parse_args(["create", "--repo", "https://example.com/s.git", *words])
        return runpod.pod_request(args, "NVIDIA A100-SXM4-80GB", "sk-x", args.repo)["env"]

    one = pod_env()
    assert "ENGINE" not in one and "TENSOR_PARALLEL_SIZE" not in one  # the server's own default: auto
    assert pod_env("--engine", "vllm")["ENGINE"] == "vllm" and "TENSOR_PARALLEL_SIZE" not in pod_env("--engine", "vllm")
    assert pod_env("--engine", "transformers")["ENGINE"] == "transformers"
    several = (["--gpu-count", "2"], ["--gpu-count", "4", "--engine", "vllm"], ["--gpu-count", "2", "--engine", "auto"])
    for words in several:
        env = pod_env(*words)
        assert env["ENGINE"] == "vllm" and env["TENSOR_PARALLEL_SIZE"] == words[1], words
    layers = pod_env("--gpu-count", "2", "--engine", "transformers")
    assert layers["ENGINE"] == "transformers" and "TENSOR_PARALLEL_SIZE" not in layers

    args = runpod.build_parser().parse_args(["create", "--gpu-count", "2"])
    assert "transformers engine cannot do tensor parallelism" in runpod.engine_settings(args)[1]
    assert runpod.engine_settings(runpod.build_parser().parse_args(["create"]))[1] is None
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            runpod.build_parser().parse_args(["create", "--gpu-count", bad])
