"""scripts/gpu_proof.sh and scripts/gpu_measure.py without a GPU: the refusal, and one engine measured end to
end on the tiny checkpoint (on the CPU, with a stand-in nvidia-smi) through the same `run` and `summary` steps
that gpu_proof.sh runs on the full-size folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_proof.sh"


def proof(*args: str, path: str, tmp_path) -> subprocess.CompletedProcess:
    """gpu_proof.sh with the given PATH and its results folder in tmp_path."""
    env = {"PATH": path, "HOME": str(tmp_path), "GPU_PROOF_RESULTS": str(tmp_path / "results"),
           "GPU_PROOF_MODEL_DIR": str(tmp_path / "full-vl")}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def stand_in(folder, script: str):
    """A folder holding an `nvidia-smi` that runs `script`."""
    folder.mkdir()
    tool = folder / "nvidia-smi"
    tool.write_text("#!/usr/bin/env bash\n" + script)
    tool.chmod(0o755)
    return folder


def test_without_an_nvidia_gpu_it_refuses_at_once(tmp_path):
    failing = stand_in(tmp_path / "failing", 'echo "NVIDIA-SMI has failed: no driver" >&2; exit 9\n')
    listing_none = stand_in(tmp_path / "none", 'echo "No devices were found"\n')
    for path in ("/usr/bin:/bin", f"{failing}:/usr/bin:/bin", f"{listing_none}:/usr/bin:/bin"):
        for engines in ([], ["vllm"], ["both"]):
            refused = proof(*engines, path=path, tmp_path=tmp_path)
            assert refused.returncode == 2, (path, refused.stdout, refused.stderr)
            assert "gpu_proof: no NVIDIA GPU here" in refused.stderr and "What to do:" in refused.stderr
            assert "bootstrap" not in refused.stdout + refused.stderr  # before installing anything
    assert not (tmp_path / "results").exists() and not (tmp_path / "full-vl").exists()

    wrong = proof("tensorrt", path="/usr/bin:/bin", tmp_path=tmp_path)
    assert wrong.returncode == 2 and "usage: scripts/gpu_proof.sh [transformers|vllm|both]" in wrong.stderr
    assert proof("vllm", "extra", path="/usr/bin:/bin", tmp_path=tmp_path).returncode == 2
    shown = proof("--help", path="/usr/bin:/bin", tmp_path=tmp_path)
    assert shown.returncode == 0 and "LOAD_FORMAT=dummy" in shown.stdout and "BENCH_DURATION" in shown.stdout


def test_one_engine_measured_end_to_end_on_the_tiny_checkpoint(tiny_vl_dir, tmp_path):
    gpu = stand_in(tmp_path / "gpu", 'case "$*" in\n  -L) echo "GPU 0: NVIDIA H200 (UUID: GPU-1)" ;;\n'
                   '  *) echo 1234 ;;\nesac\n')
    results = tmp_path / "results"
    env = {**os.environ, "PATH": f"{gpu}:{os.environ['PATH']}", "DEVICE_MAP": "cpu", "DTYPE": "float32"}
    measured = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_measure.py"), "run", "--engine", "transformers",
         "--server-python", sys.executable, "--model-dir", str(tiny_vl_dir), "--out", str(results / "transformers"),
         "--context-tokens", "256", "--answer-tokens", "8", "--repeats", "1", "--concurrency", "1",
         "--duration", "1", "--load-timeout", "180"],
        env=env, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    out = results / "transformers"
    result = json.loads((out / "result.json").read_text())
    assert measured.returncode == 0, (measured.stdout, measured.stderr, result["errors"], (out / "server.log").read_text())
    assert result["errors"] == []
    # The server the proof starts: random weights, the context limit and engine asked for, warmed up.
    assert result["settings"]["LOAD_FORMAT"] == "dummy" and result["settings"]["MAX_MODEL_LEN"] == "4096"
    assert result["health"]["status"] == "ready" and result["health"]["engine"] == "transformers"
    assert "warm-up generation done" in (out / "server.log").read_text()
    assert result["memory_after_load_mib"] == [1234] and result["versions"]["transformers"]
    long = result["long_request"]
    assert 200 <= long["text_prompt_tokens"] <= 320 and long["prompt_tokens"] > long["text_prompt_tokens"]
    assert long["completion_tokens"] == 8 and long["peak_memory_mib"] == [1234]
    for kind in ("text_answer", "image_answer"):
        assert result[kind]["completion_tokens"] == [8] and result[kind]["ttft_s"] < result[kind]["latency_s"]
    (level,) = result["bench"]
    assert level["concurrency"] == 1 and level["requests"] >= 1 and level["errors"] == 0
    assert (out / "bench.txt").is_file() and (out / "bench.json").is_file()

    summary = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_measure.py"), "summary", str(results)],
                             capture_output=True, text=True, timeout=60, check=True)
    text = (results / "summary.md").read_text()
    assert text == summary.stdout.rstrip("\n") + "\n" or text.strip() == summary.stdout.strip()
    assert "| measured | transformers |" in text and "| GPU memory after load | 1,234 MiB |" in text
    assert "| transformers | 1 |" in text and "Failed stages" not in text
