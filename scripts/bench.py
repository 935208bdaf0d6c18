"""Throughput and latency of an OpenAI-compatible server under closed-loop load, side by side with peers.

    python scripts/bench.py                              # our server on the bench checkpoint, 1/8/32 clients
    python scripts/bench.py --vs-transformers-serve --raw
    python scripts/bench.py --url http://host:8000 --model NAME   # any running endpoint
    python scripts/bench.py --vs-vllm --loads text,mixed           # vllm serve vs ours on vLLM and transformers

Each client sends a request, waits for the whole (streamed) answer, and sends the next one, for `--duration`
seconds per concurrency level. Requests are text, and every `--image-every`-th one carries a photo. Per level
it reports requests/s, output tokens/s, p50/p95 latency, p50/p95 time to first token and errors.

`--vs-transformers-serve` starts `transformers serve` on the same checkpoint and runs the same load against it,
alternating with ours level by level, and prints ratios. `--raw` measures plain `model.generate` at batch 1
and at the largest concurrency: the ceiling of this stack. The table goes to stdout, everything to `--json`.

`--vs-vllm` starts `vllm serve` (from `--vllm-python`'s environment, .venv-vllm), ours with ENGINE=vllm (same
environment) and ours with ENGINE=transformers (this interpreter) on the same checkpoint, with the same engine
options, and runs each `--loads` (text only, and mixed: every 4th request with a photo) against all three, the
order rotating level by level; it prints ours / vllm serve ratios and whether the target holds (see
scripts/bench_vs_vllm.py). `--enforce-eager` skips vLLM's compilation on both (quick runs only: not what
`vllm serve` does by default).
Only loopback addresses are started here; the load stops by itself after each level.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `--raw` loads the checkpoint with the server's own choice of model class
sys.path.insert(0, str(ROOT / "scripts"))  # its helper modules, however this file was loaded

import bench_vs_vllm as vs
from bench_servers import (
    SERVED_NAME,
    Server,
    VllmSetup,
    process_tree_rss_mib,
    start_ours,
    start_transformers_serve,
)

PROMPTS = [
    "请介绍舌诊的基本方法。",
    "舌质淡红，舌苔薄白，脉缓，这是什么体质？",
    "What does a yellow greasy tongue coating suggest in TCM?",
    "四君子汤由哪些药物组成？有什么功效？",
    "面色萎黄，乏力，食欲不振，应该如何调理？",
    "Please explain the difference between qi deficiency and yang deficiency.",
]


@dataclass
class Sample:
    """One finished request."""

    latency: float
    ttft: float | None
    tokens: int
    ok: bool
    image: bool


@dataclass
class LevelResult:
    """What one server did at one concurrency level."""

    server: str
    concurrency: int
    seconds: float
    requests: int
    errors: int
    output_tokens: int
    requests_per_second: float
    tokens_per_second: float
    latency_p50: float | None
    latency_p95: float | None
    ttft_p50: float | None
    ttft_p95: float | None
    error_examples: list[str] = field(default_factory=list)
    rss_before_mib: float | None = None  # the server's resident memory (ours reports it in /health)
    rss_after_mib: float | None = None
    prefill_share: float | None = None  # ours: fraction of the level's wall time spent in prefill passes
    decode_share: float | None = None  # ... and in decode steps (the rest: HTTP, queueing, idle)
    prefill_passes: int | None = None
    decode_steps: int | None = None


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile, or None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))]


def photo_data_uri(width: int = 448, height: int = 336) -> str:
    """A generated JPEG (a reddish gradient, tongue-coloured), as a data: URI."""
    from PIL import Image

    image = Image.new("RGB", (width, height))
    image.putdata([(180 + x % 60, 60 + y % 40, 70) for y in range(height) for x in range(width)])
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


class Load:
    """Builds the requests of one run (same sequence for every server)."""

    def __init__(self, model: str, max_tokens: int, image_every: int, ignore_eos: bool) -> None:
        self.model = model
        self.max_tokens = max_tokens
        self.image_every = image_every
        self.ignore_eos = ignore_eos
        self.image = photo_data_uri() if image_every else None

    def request(self, index: int) -> tuple[dict, bool]:
        """The body of request number `index`, and whether it has an image."""
        text = PROMPTS[index % len(PROMPTS)]
        with_image = bool(self.image_every) and index % self.image_every == self.image_every - 1
        content: str | list = text
        if with_image:
            content = [{"type": "image_url", "image_url": {"url": self.image}}, {"type": "text", "text": text}]
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body, with_image


async def one_request(client: httpx.AsyncClient, body: dict, with_image: bool) -> tuple[Sample, str | None]:
    """Send one streamed request; measure latency, time to first content, and output tokens."""
    started = time.perf_counter()
    ttft = None
    tokens = 0
    chunks = 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
            async for line in response.aiter_lines():
                # Parse only what is needed: the bench client shares the CPU with the server it measures.
                if ttft is None and '"content":"' in line and '"content":""' not in line:
                    ttft = time.perf_counter() - started
                if '"content":"' in line:
                    chunks += 1
                if '"usage":{' in line or '"usage": {' in line or '"error"' in line:  # not `"usage":null`
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise RuntimeError(f"error event: {event['error']}")
                    tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
    except Exception as exc:  # noqa: BLE001 - counted as an error of this level; the run goes on
        return Sample(time.perf_counter() - started, ttft, 0, False, with_image), str(exc)
    return Sample(time.perf_counter() - started, ttft, tokens or chunks, True, with_image), None


async def server_state(client: httpx.AsyncClient) -> tuple[float | None, dict]:
    """The server's RSS (MiB) and scheduler counters from our /health (None / {} for other servers)."""
    try:
        health = (await client.get("/health")).json()
    except (httpx.HTTPError, ValueError):
        return None, {}
    if not isinstance(health, dict):
        return None, {}
    memory = health.get("memory") or {}
    rss = (memory.get("process_rss_bytes") or 0) + (memory.get("engine_core_rss_bytes") or 0)  # vLLM: its core too
    return (round(rss / 2**20, 1) if rss else None), health.get("scheduler") or {}


async def run_level(
    name: str, url: str, load: Load, concurrency: int, duration: float, pid: int | None = None
) -> LevelResult:
    """`concurrency` closed-loop clients for `duration` seconds. With the server's `pid`, its RSS is that of
    its whole process tree (every server alike); without, what our /health reports."""
    samples: list[Sample] = []
    errors: list[str] = []
    counter = iter(range(10**9))
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600), limits=limits) as client:
        await one_request(client, *load.request(0))  # warm-up, not counted
        if load.image_every:
            await one_request(client, *load.request(load.image_every - 1))  # ... and one with the photo
        rss_before, counters_before = await server_state(client)
        rss_before_tree = process_tree_rss_mib(pid) if pid is not None else None
        deadline = time.perf_counter() + duration
        started = time.perf_counter()

        async def client_loop() -> None:
            while time.perf_counter() < deadline:
                sample, error = await one_request(client, *load.request(next(counter)))
                samples.append(sample)
                if error and len(errors) < 5:
                    errors.append(error)

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        rss_after, counters_after = await server_state(client)
    if pid is not None:
        rss_before, rss_after = rss_before_tree, process_tree_rss_mib(pid)
    good = [sample for sample in samples if sample.ok]
    tokens = sum(sample.tokens for sample in good)
    return LevelResult(
        server=name,
        concurrency=concurrency,
        seconds=round(elapsed, 2),
        requests=len(good),
        errors=len(samples) - len(good),
        output_tokens=tokens,
        requests_per_second=len(good) / elapsed,
        tokens_per_second=tokens / elapsed,
        latency_p50=percentile([s.latency for s in good], 0.50),
        latency_p95=percentile([s.latency for s in good], 0.95),
        ttft_p50=percentile([s.ttft for s in good if s.ttft is not None], 0.50),
        ttft_p95=percentile([s.ttft for s in good if s.ttft is not None], 0.95),
        error_examples=errors,
        rss_before_mib=rss_before,
        rss_after_mib=rss_after,
        **scheduler_shares(counters_before, counters_after, elapsed),
    )


def scheduler_shares(before: dict, after: dict, elapsed: float) -> dict:
    """How the inference thread spent the level: prefill vs decode time, passes and steps."""
    if not before or not after or "prefill_ms" not in after:
        return {}
    return {
        "prefill_share": round((after["prefill_ms"] - before["prefill_ms"]) / 1000 / elapsed, 3),
        "decode_share": round((after["decode_ms"] - before["decode_ms"]) / 1000 / elapsed, 3),
        "prefill_passes": after["prefill_passes"] - before["prefill_passes"],
        "decode_steps": after["decode_steps"] - before["decode_steps"],
    }


def raw_generate(checkpoint: Path, batch_sizes: list[int], max_tokens: int) -> list[dict]:
    """Tokens/s of plain `model.generate` (greedy, exactly `max_tokens` new tokens, left padding)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from backend.engines.transformers_engine.loader import model_class_for

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    # The class the server itself would pick: a text-only checkpoint (Qwen2) is a causal LM, not image-text.
    model_class = model_class_for(AutoConfig.from_pretrained(checkpoint))
    model = model_class.from_pretrained(checkpoint, dtype=torch.float32).eval()
    results = []
    for batch in batch_sizes:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False, add_generation_prompt=True
            )
            for i in range(batch)
        ]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        options = {
            "max_new_tokens": max_tokens,
            "min_new_tokens": max_tokens,
            "do_sample": False,
            "temperature": None,
            "top_p": None,
            "top_k": None,
        }
        timings = []
        with torch.inference_mode():
            model.generate(**inputs, **{**options, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
            for _ in range(3):  # the median of three: this machine is shared and noisy
                started = time.perf_counter()
                output = model.generate(**inputs, **options)
                timings.append(time.perf_counter() - started)
        elapsed = statistics.median(timings)
        new_tokens = (output.shape[1] - inputs["input_ids"].shape[1]) * batch
        results.append({"batch": batch, "seconds": round(elapsed, 3), "tokens_per_second": new_tokens / elapsed})
    return results


def fmt(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def print_table(results: list[LevelResult], raw: list[dict]) -> None:
    print(
        f"\n{'server':<40}{'clients':>8}{'req/s':>9}{'tok/s':>10}{'p50 lat':>10}{'p95 lat':>10}{'p50 ttft':>10}{'p95 ttft':>10}{'errors':>8}"
    )
    for result in results:
        rss = f"  (RSS {result.rss_before_mib} -> {result.rss_after_mib} MiB" if result.rss_after_mib else ""
        if result.prefill_share is not None:
            rss += (
                f"; prefill {result.prefill_share:.0%} in {result.prefill_passes} passes,"
                f" decode {result.decode_share:.0%} in {result.decode_steps} steps"
            )
        rss += ")" if rss else ""
        print(
            f"{result.server:<40}{result.concurrency:>8}{result.requests_per_second:>9.2f}{result.tokens_per_second:>10.1f}"
            f"{fmt(result.latency_p50, 's'):>10}{fmt(result.latency_p95, 's'):>10}{fmt(result.ttft_p50, 's'):>10}"
            f"{fmt(result.ttft_p95, 's'):>10}{result.errors:>8}{rss}"
        )
    ours = {r.concurrency: r for r in results if r.server == "ours"}
    peers = sorted({r.server for r in results if r.server != "ours"})
    if peers or raw:
        print("\nratios (ours / other):")
    for peer in peers:
        for result in (r for r in results if r.server == peer):
            mine = ours.get(result.concurrency)
            if mine and result.tokens_per_second:
                latency = (
                    f", p95 latency {mine.latency_p95 / result.latency_p95:.2f}x"
                    if mine.latency_p95 and result.latency_p95
                    else ""
                )
                print(
                    f"  vs {peer:<38} {result.concurrency:>3} clients: tok/s {mine.tokens_per_second / result.tokens_per_second:.2f}x{latency}"
                )
    print_raw(raw, ours)


def print_raw(raw: list[dict], ours: dict[int, LevelResult]) -> None:
    for entry in raw:
        mine = ours.get(entry["batch"])
        share = f"; ours at {entry['batch']} clients = {mine.tokens_per_second / entry['tokens_per_second']:.2f}x"
        print(
            f"  raw generate, batch {entry['batch']:>3}: {entry['tokens_per_second']:.1f} tok/s{share if mine else ''}"
        )


def ensure_checkpoint(path: Path, size: str) -> Path:
    if not (path / "config.json").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), "--out", str(path), "--size", size],
            check=True,
        )
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="benchmark this running endpoint instead of starting our server")
    parser.add_argument("--model", default=SERVED_NAME, help="model name to send (with --url)")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: the bench checkpoint)")
    parser.add_argument(
        "--size", default="bench", choices=["tiny", "small", "bench"], help="size of the made checkpoint"
    )
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per level and server")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--image-every", type=int, default=4, help="every n-th request has an image (0: none)")
    parser.add_argument("--ignore-eos", action="store_true", help="send vLLM's ignore_eos (exactly max_tokens)")
    parser.add_argument("--vs-transformers-serve", action="store_true", help="also run `transformers serve`")
    parser.add_argument("--continuous-batching", action="store_true", help="also run it with --continuous-batching")
    parser.add_argument(
        "--transformers-bin",
        default=str(Path(sys.executable).with_name("transformers")),
        help="the `transformers` CLI to start (it needs torchvision for Qwen2.5-VL)",
    )
    vs.add_arguments(parser, default_vllm_python=ROOT / ".venv-vllm" / "bin" / "python")
    parser.add_argument("--raw", action="store_true", help="measure plain model.generate too")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results.json", help="where to write all results")
    parser.add_argument("--log-dir", type=Path, default=ROOT / ".cache" / "bench-logs")
    args = parser.parse_args(argv)
    try:
        args.levels = [int(level) for level in args.concurrency.split(",")]
        if not args.levels or min(args.levels) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--concurrency takes comma-separated positive client counts; got {args.concurrency!r}")
    if args.vs_vllm and (args.url or args.vs_transformers_serve):
        parser.error("--vs-vllm starts its own servers: not with --url or --vs-transformers-serve")
    try:
        args.load_names = vs.parse_loads(args.loads)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def report(result: LevelResult, load: str = "") -> None:
    """One line as each run ends (the table comes at the end)."""
    print(
        f"{load + ' ' if load else ''}{result.server:<40} {result.concurrency:>3} clients: "
        f"{result.tokens_per_second:8.1f} tok/s, {result.errors} errors",
        flush=True,
    )


async def run_vs_vllm(args: argparse.Namespace, checkpoint: Path) -> dict:
    """`--vs-vllm`: the three servers, every load against them (see scripts/bench_vs_vllm.py)."""
    if not Path(args.vllm_python).exists():
        raise SystemExit(f"{args.vllm_python} not found: build it with `bash scripts/bootstrap_vllm.sh`")
    setup = VllmSetup(
        checkpoint,
        args.log_dir,
        vllm_python=args.vllm_python,
        transformers_python=sys.executable,
        max_num_seqs=max(args.levels),
        kv_cache_gib=args.kv_cache_gib,
        max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager,
        start_timeout=args.start_timeout,
        dtype=args.vllm_dtype,
    )
    loads = {name: Load(SERVED_NAME, args.max_tokens, vs.LOADS[name], args.ignore_eos) for name in args.load_names}

    async def measure(server: Server, load: str, level: int) -> LevelResult:
        result = await run_level(server.name, server.url, loads[load], level, args.duration, server.pid)
        report(result, load)
        return result

    return await vs.run_vs_vllm(setup, args.load_names, args.levels, measure)


async def run(args: argparse.Namespace) -> int:
    levels = args.levels
    checkpoint = args.checkpoint or ensure_checkpoint(ROOT / ".cache" / f"{args.size}-vl", args.size)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    raw = raw_generate(checkpoint, sorted({1, max(levels)}), args.max_tokens) if args.raw else []
    if args.vs_vllm:
        output = await run_vs_vllm(args, checkpoint)
        print_raw(raw, {})
        write_json(args, {**output, "raw_generate": raw})
        return 0

    servers: list[Server] = []
    targets: list[tuple[str, str, str, int | None]] = []  # (name, url, model, pid)
    try:
        if args.url:
            targets.append(("ours", args.url, args.model, None))
        else:
            servers.append(start_ours(checkpoint, max(levels), args.log_dir))
            targets.append(("ours", servers[-1].url, SERVED_NAME, servers[-1].pid))
        if args.vs_transformers_serve:
            modes = [False, True] if args.continuous_batching else [False]
            for continuous in modes:
                servers.append(start_transformers_serve(checkpoint, args.transformers_bin, continuous, args.log_dir))
                targets.append((servers[-1].name, servers[-1].url, str(checkpoint), servers[-1].pid))
        results: list[LevelResult] = []
        for round_index, level in enumerate(levels):
            by_name = {target[0]: target for target in targets}
            for name in vs.level_order(list(by_name), round_index):  # rotate who goes first
                _, url, model, pid = by_name[name]
                load = Load(model, args.max_tokens, args.image_every, args.ignore_eos)
                results.append(await run_level(name, url, load, level, args.duration, pid))
                report(results[-1])
    finally:
        for server in servers:
            server.stop()
    print_table(results, raw)
    write_json(args, {"levels": [asdict(r) for r in results], "raw_generate": raw})
    return 0


def write_json(args: argparse.Namespace, output: dict) -> None:
    arguments = {k: str(v) for k, v in vars(args).items()}
    args.json.write_text(json.dumps({**output, "args": arguments}, indent=2))
    print(f"\nresults written to {args.json}")


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
