#!/usr/bin/env python3
"""Measure one engine serving the full-size architecture: load, GPU memory, answer latency, throughput.

scripts/gpu_proof.sh calls it once per engine, then for the summary; it works alone as well:

    python scripts/gpu_measure.py run --engine vllm --server-python .venv-vllm/bin/python \\
        --model-dir .cache/full-vl --out .cache/gpu-proof/NOW/vllm
    python scripts/gpu_measure.py measure --url http://127.0.0.1:8000 --model NAME --out DIR   # a running server
    python scripts/gpu_measure.py summary .cache/gpu-proof/NOW    # summary.md from each engine's result.json

`run` starts `python -m backend` with LOAD_FORMAT=dummy (random weights: no download), waits for /health to
say ready, and records in OUT/result.json:
- the load time, GPU memory after loading (nvidia-smi memory.used, per GPU) and its peak while loading;
- the peak GPU memory during one request with ~2,048 tokens of text and one 360x420 image;
- latency and time to first token (TTFT: until the first chunk with content) of a 100-token text answer and
  a 100-token image answer, streamed with `ignore_eos` so that every answer is exactly 100 tokens;
- scripts/bench.py against the server (1, 8 and 32 clients, 64 tokens each; its table in OUT/bench.txt).
A stage that fails is recorded under `errors` and the next one still runs. Needs the standard library, httpx
and Pillow (the project's venv); the server runs from --server-python (each engine has its own venv).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_summary, beside this file

import httpx

ROOT = Path(__file__).resolve().parents[1]
NVIDIA_SMI_MEMORY = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
# Repeated to make the long context; mixed Chinese and English, as the model's users write.
CONTEXT_UNIT = "患者舌质淡红，苔薄白，脉缓，面色萎黄，乏力，食欲不振。The tongue is pale red with a thin white coating. "
TEXT_QUESTION = "请介绍舌诊的基本方法。"
IMAGE_QUESTION = "请描述这张舌象图片。"


class MeasureError(RuntimeError):
    """A stage could not be measured (HTTP error, error event, server gone); recorded, not fatal."""


def gpu_memory_mib(command: list[str] = NVIDIA_SMI_MEMORY) -> list[int]:
    """memory.used of each GPU in MiB, as nvidia-smi reports it; [] where it is missing or fails."""
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout
        return [int(float(line)) for line in output.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


class PeakMemory:
    """While open, polls GPU memory in a thread; `peak` is the sample with the largest total (MiB per GPU).

    nvidia-smi sees every process's memory, which matters for vLLM: its engine core is another process.
    """

    def __init__(self, interval: float = 0.1, read: Callable[[], list[int]] = gpu_memory_mib) -> None:
        self.interval, self.read = interval, read
        self.peak: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="gpu-memory", daemon=True)

    def sample(self) -> None:
        """Read once and keep the reading if it is the largest so far."""
        values = self.read()
        if values and sum(values) > sum(self.peak):
            self.peak = values

    def _poll(self) -> None:
        self.sample()
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # the state at the end counts too (a short request can fall between two polls)


def image_data_uri(width: int = 360, height: int = 420) -> str:
    """A generated JPEG of the given size (a tongue-coloured gradient, not one flat colour), as a data: URI."""
    from PIL import Image

    image = Image.new("RGB", (width, height))
    image.putdata([(170 + x % 70, 60 + y % 50, 80) for y in range(height) for x in range(width)])
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_body(model: str, text: str, image: str | None = None, max_tokens: int = 100, stream: bool = True) -> dict:
    """A chat request of exactly `max_tokens` answer tokens (ignore_eos), greedy, with usage in the stream."""
    content: str | list = text
    if image is not None:
        content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": text}]
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


@dataclass
class Answer:
    """One streamed answer, timed from sending the request."""

    latency_s: float
    ttft_s: float | None
    completion_tokens: int | None
    prompt_tokens: int | None
    content_chunks: int

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first, per second after the first: the decode speed one client sees."""
        if self.ttft_s is None or not self.completion_tokens or self.latency_s <= self.ttft_s:
            return None
        return (self.completion_tokens - 1) / (self.latency_s - self.ttft_s)


def read_stream(lines: Iterable[str], started: float, clock: Callable[[], float] = time.perf_counter) -> Answer:
    """Read an OpenAI chat stream (server-sent events) as it arrives: the first chunk with content sets TTFT
    (a first chunk carrying only the role does not), the usage chunk gives the token counts."""
    ttft, chunks, usage = None, 0, {}
    for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators and keep-alive comments
        data = line[5:].strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            raise MeasureError(f"error event in the stream: {event['error']}")
        for choice in event.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                chunks += 1
                if ttft is None:
                    ttft = clock() - started
        usage = event.get("usage") or usage
    return Answer(clock() - started, ttft, usage.get("completion_tokens"), usage.get("prompt_tokens"), chunks)


def stream_answer(client: httpx.Client, body: dict) -> Answer:
    """Send one streamed chat request and time it."""
    started = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise MeasureError(f"HTTP {response.status_code}: {response.text[:300]}")
        return read_stream(response.iter_lines(), started)


def prompt_tokens(client: httpx.Client, model: str, text: str) -> int:
    """How many prompt tokens the server counts for `text` as one user message (template included)."""
    response = client.post("/v1/chat/completions", json=chat_body(model, text, max_tokens=1, stream=False))
    if response.status_code != 200:
        raise MeasureError(f"HTTP {response.status_code}: {response.text[:300]}")
    return int(response.json()["usage"]["prompt_tokens"])


def context_text(client: httpx.Client, model: str, target_tokens: int) -> tuple[str, int]:
    """Text of about `target_tokens` prompt tokens, counted by the server's own tokenizer (two probes give the
    tokens per repeated unit and the template's overhead), and the count of the text chosen."""
    small, large = 1, 9
    first, second = (prompt_tokens(client, model, CONTEXT_UNIT * count) for count in (small, large))
    per_unit = max((second - first) / (large - small), 1.0)
    units = max(1, round((target_tokens - (first - per_unit * small)) / per_unit))
    text = CONTEXT_UNIT * units
    return text, prompt_tokens(client, model, text)


def timed_answers(client: httpx.Client, body: dict, repeats: int) -> dict[str, Any]:
    """`repeats` answers to the same request: each run, and the medians."""
    runs = [stream_answer(client, body) for _ in range(repeats)]

    def median(values: list[float | None]) -> float | None:
        present = [value for value in values if value is not None]
        return round(statistics.median(present), 4) if present else None

    return {
        "runs": [{**asdict(run), "decode_tokens_per_s": run.decode_tokens_per_s} for run in runs],
        "latency_s": median([run.latency_s for run in runs]),
        "ttft_s": median([run.ttft_s for run in runs]),
        "decode_tokens_per_s": median([run.decode_tokens_per_s for run in runs]),
        "completion_tokens": [run.completion_tokens for run in runs],
    }


def attempt(result: dict[str, Any], name: str, stage: Callable[[], Any]) -> Any:
    """Run one stage; its value goes to result[name], or its failure to result["errors"]."""
    try:
        result[name] = stage()
    except (MeasureError, httpx.HTTPError, KeyError, ValueError, OSError) as error:
        result.setdefault("errors", []).append(f"{name}: {type(error).__name__}: {error}")
    return result.get(name)


def measure(url: str, model: str, context_tokens: int = 2048, answer_tokens: int = 100, repeats: int = 3,
            api_key: str | None = None) -> dict[str, Any]:
    """The request measurements against a running server (see the module's docstring)."""
    result: dict[str, Any] = {"errors": []}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    image = image_data_uri()
    with httpx.Client(base_url=url, timeout=httpx.Timeout(900), headers=headers) as client:

        def long_request() -> dict[str, Any]:
            text, text_tokens = context_text(client, model, context_tokens)
            body = chat_body(model, text + "\n" + IMAGE_QUESTION, image, answer_tokens)
            with PeakMemory() as peak:
                answer = stream_answer(client, body)
            return {**asdict(answer), "text_prompt_tokens": text_tokens, "peak_memory_mib": peak.peak,
                    "peak_memory_total_mib": sum(peak.peak) if peak.peak else None}

        attempt(result, "long_request", long_request)
        attempt(result, "text_answer", lambda: timed_answers(client, chat_body(model, TEXT_QUESTION, None,
                                                                               answer_tokens), repeats))
        attempt(result, "image_answer", lambda: timed_answers(client, chat_body(model, IMAGE_QUESTION, image,
                                                                                answer_tokens), repeats))
    return result


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_environment(args: argparse.Namespace, port: int) -> dict[str, str]:
    """The server's settings: this environment (DTYPE, TENSOR_PARALLEL_SIZE ... pass through) with the model,
    random weights, the engine and a loopback port, and without a key (the measuring client sends none)."""
    env = {name: value for name, value in os.environ.items() if name not in ("API_KEY", "PORT_HEALTH")}
    env.update(MODEL_ID=str(Path(args.model_dir).resolve()), SERVED_MODEL_NAME=args.served_name,
               LOAD_FORMAT="dummy", MAX_MODEL_LEN=str(args.max_model_len), ENGINE=args.engine, HOST="127.0.0.1",
               PORT=str(port), WARMUP="1", HF_HUB_OFFLINE="1", LOG_FORMAT="text")
    return env


def wait_ready(url: str, process: subprocess.Popen, timeout: float) -> dict[str, Any]:
    """Poll /health until the model is ready; its body. Raises when it failed, exited or took too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise MeasureError(f"the server exited with {process.returncode} while loading (see server.log)")
        try:
            body = httpx.get(f"{url}/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            body = {}
        if body.get("status") == "ready":
            return body
        if body.get("status") == "error":
            raise MeasureError(f"the model failed to load: {body.get('error')}")
        time.sleep(1)
    raise MeasureError(f"not ready after {timeout:g} s (see server.log)")


def versions(python: str) -> dict[str, str]:
    """torch, transformers and vllm as installed for the server's interpreter."""
    script = ("import importlib.metadata as m, json\nfound = {}\nfor name in ('torch', 'transformers', 'vllm'):\n"
              "    try: found[name] = m.version(name)\n    except m.PackageNotFoundError: pass\n"
              "print(json.dumps(found))")
    try:
        return json.loads(subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=120).stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}


def run_bench(url: str, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """scripts/bench.py against the running server; its levels (table in bench.txt, all in bench.json)."""
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--url", url, "--model", args.served_name,
               "--concurrency", args.concurrency, "--duration", str(args.duration), "--max-tokens",
               str(args.bench_max_tokens), "--ignore-eos", "--checkpoint", str(args.model_dir),  # not made anew
               "--json", str(out / "bench.json"), "--log-dir", str(out / "bench-logs")]
    with open(out / "bench.txt", "w") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
    if finished.returncode != 0:
        raise MeasureError(f"bench.py exited with {finished.returncode} (see bench.txt)")
    return json.loads((out / "bench.json").read_text())["levels"]


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (the server's graceful shutdown), SIGKILL after a minute."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cmd_run(args: argparse.Namespace) -> int:
    """Start the server on one engine, measure it, stop it; OUT/result.json. Exit 1 when a stage failed."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = server_environment(args, port)
    result: dict[str, Any] = {
        "engine": args.engine, "model_dir": str(args.model_dir), "started_at": datetime.now(UTC).isoformat(),
        "versions": versions(args.server_python), "errors": [],
        "settings": {name: env[name] for name in ("ENGINE", "LOAD_FORMAT", "MAX_MODEL_LEN", "MODEL_ID")},
    }
    with open(out / "server.log", "w") as log:
        with PeakMemory(interval=0.5) as loading:
            started = time.perf_counter()
            process = subprocess.Popen([args.server_python, "-m", "backend"], cwd=ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT)
            health = attempt(result, "health", lambda: wait_ready(url, process, args.load_timeout))
        try:
            if health is not None:
                result["load_seconds"] = round(time.perf_counter() - started, 1)  # warm-up included
                result["memory_after_load_mib"] = gpu_memory_mib()
                result["peak_memory_while_loading_mib"] = loading.peak
                measured = measure(url, args.served_name, args.context_tokens, args.answer_tokens, args.repeats)
                result["errors"] += measured.pop("errors")
                result.update(measured)
                attempt(result, "bench", lambda: run_bench(url, args, out))
        finally:
            stop(process)
            # Written whatever happened: what was measured before a failure is worth keeping.
            (out / "result.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    failed = f"; {len(result['errors'])} stage(s) failed" if result["errors"] else ""
    print(f"{args.engine}: {out / 'result.json'}{failed}")
    return 1 if result["errors"] else 0


def cmd_measure(args: argparse.Namespace) -> int:
    """Measure a server that is already running; OUT/result.json."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"url": args.url, "memory_before_mib": gpu_memory_mib(),
              **measure(args.url, args.model, args.context_tokens, args.answer_tokens, args.repeats,
                        os.environ.get("API_KEY") or None)}
    (out / "result.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return 1 if result["errors"] else 0


def cmd_summary(args: argparse.Namespace) -> int:
    """Write RESULTS/summary.md from RESULTS/*/result.json (and machine.txt) and print it."""
    from gpu_summary import summary_markdown

    folder = Path(args.results)
    results = {path.parent.name: json.loads(path.read_text()) for path in sorted(folder.glob("*/result.json"))}
    machine = (folder / "machine.txt").read_text() if (folder / "machine.txt").is_file() else ""
    text = summary_markdown(results, machine)
    (folder / "summary.md").write_text(text)
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """run / measure / summary, with the measurement sizes shared by run and measure."""
    sizes = argparse.ArgumentParser(add_help=False)
    sizes.add_argument("--context-tokens", type=int, default=2048, help="text of the long request (default 2048)")
    sizes.add_argument("--answer-tokens", type=int, default=100, help="tokens of each timed answer (default 100)")
    sizes.add_argument("--repeats", type=int, default=3, help="timed answers of each kind (default 3)")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", parents=[sizes], help="start the server on one engine and measure it")
    run.add_argument("--engine", choices=["transformers", "vllm"], required=True)
    run.add_argument("--server-python", required=True, help="the interpreter of that engine's venv")
    run.add_argument("--model-dir", type=Path, required=True, help="checkpoint folder (weights not needed)")
    run.add_argument("--out", required=True, help="folder for result.json, server.log, bench.*")
    run.add_argument("--served-name", default="full-vl")
    run.add_argument("--max-model-len", type=int, default=4096)
    run.add_argument("--load-timeout", type=float, default=1800, help="seconds until ready (default 1800)")
    run.add_argument("--concurrency", default="1,8,32", help="bench.py levels (default 1,8,32)")
    run.add_argument("--duration", type=float, default=30, help="bench.py seconds per level (default 30)")
    run.add_argument("--bench-max-tokens", type=int, default=64)
    running = commands.add_parser("measure", parents=[sizes], help="measure a running server (API_KEY from env)")
    running.add_argument("--url", required=True)
    running.add_argument("--model", required=True)
    running.add_argument("--out", required=True)
    summary = commands.add_parser("summary", help="summary.md from a results folder")
    summary.add_argument("results")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand."""
    args = build_parser().parse_args(argv)
    return {"run": cmd_run, "measure": cmd_measure, "summary": cmd_summary}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
