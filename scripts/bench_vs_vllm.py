"""`scripts/bench.py --vs-vllm`: the plan, the ratios against `vllm serve`, the target and the table.

Three servers on one checkpoint: `vllm serve` (the peer), ours with ENGINE=vllm and ours with
ENGINE=transformers. Within each concurrency level of each load all three run one after the other, the
order rotating from level to level, so that noise on a shared machine hits all three alike. The target:
ours with ENGINE=vllm gives at least 0.95x the peer's tokens/s, and at most 1.05x its p95 latency and p95
time to first token. Pure functions of the results (anything with LevelResult's attributes): tested without
starting vLLM.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PEER = "vllm serve"
OURS_VLLM = "ours (vllm)"
OURS_TRANSFORMERS = "ours (transformers)"
SERVERS = (PEER, OURS_VLLM, OURS_TRANSFORMERS)

LOADS = {"text": 0, "mixed": 4}  # load name -> every n-th request carries the photo (0: none)
LOAD_TITLES = {"text": "text only", "mixed": "mixed: every 4th request has a 448x336 photo"}

MIN_TOKENS_RATIO = 0.95  # ours (vllm) tokens/s over the peer's, at least
MAX_LATENCY_RATIO = 1.05  # ours (vllm) p95 latency and p95 TTFT over the peer's, at most


def add_arguments(parser: argparse.ArgumentParser, default_vllm_python: Path) -> None:
    group = parser.add_argument_group("--vs-vllm: vllm serve, ours on vLLM and ours on transformers")
    group.add_argument("--vs-vllm", action="store_true", help="run the three-way comparison (not with --url)")
    group.add_argument(
        "--loads", default="text,mixed", help="comma-separated: text (no images), mixed (every 4th; not --image-every)"
    )
    group.add_argument("--vllm-python", default=str(default_vllm_python), help="interpreter with vLLM (.venv-vllm)")
    group.add_argument("--enforce-eager", action="store_true", help="no vLLM compilation, on both (quick runs)")
    group.add_argument(
        "--vllm-dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="dtype of both vLLM servers (auto: bfloat16; float32 on CPUs without native bfloat16)",
    )
    group.add_argument("--kv-cache-gib", type=float, default=2.0, help="vLLM CPU KV cache of each server (GiB)")
    group.add_argument("--max-model-len", type=int, default=2048, help="context length of every server")
    group.add_argument("--start-timeout", type=float, default=900.0, help="seconds each server may take to start")


def parse_loads(text: str) -> list[str]:
    """`--loads text,mixed` -> ["text", "mixed"] (order kept, duplicates dropped)."""
    loads = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [load for load in loads if load not in LOADS]
    if unknown or not loads:
        raise ValueError(f"--loads takes a comma-separated subset of {', '.join(LOADS)}; got {text!r}")
    return loads


def level_order(servers: Sequence[str], round_index: int) -> list[str]:
    """Who runs when in round `round_index`: the list rotated by one each round, so each server goes first,
    middle and last equally often (for two servers: the order reverses every round)."""
    if not servers:
        return []
    shift = round_index % len(servers)
    return list(servers[shift:]) + list(servers[:shift])


def plan(loads: Sequence[str], levels: Sequence[int], servers: Sequence[str] = SERVERS) -> list[tuple[str, int, str]]:
    """Every (load, clients, server) run in the order they happen; rounds are counted across loads."""
    runs = []
    for round_index, (load, level) in enumerate((load, level) for load in loads for level in levels):
        runs += [(load, level, server) for server in level_order(servers, round_index)]
    return runs


async def run_plan(
    loads: Sequence[str], levels: Sequence[int], measure: Callable[[str, str, int], Awaitable[Any]]
) -> dict[str, list]:
    """Run the plan, `measure(load, server, clients)` each step; each load's results in the order measured."""
    results: dict[str, list] = {load: [] for load in loads}
    for load, level, server in plan(loads, levels):
        results[load].append(await measure(load, server, level))
    return results


async def run_vs_vllm(
    setup: Any, loads: Sequence[str], levels: Sequence[int], measure: Callable[[Any, str, int], Awaitable[Any]]
) -> dict:
    """Start the three servers (`setup`: bench_servers.VllmSetup), run the plan with `measure(server, load,
    clients)`, stop them, print the tables; the JSON output."""
    servers: dict[str, Any] = {}
    try:  # one after the other: vLLM compilations at once on a small machine only slow each other down
        servers[PEER] = setup.start_peer(PEER)
        servers[OURS_VLLM] = setup.start_ours(OURS_VLLM, "vllm")
        servers[OURS_TRANSFORMERS] = setup.start_ours(OURS_TRANSFORMERS, "transformers")
        results = await run_plan(loads, levels, lambda load, name, level: measure(servers[name], load, level))
    finally:
        for server in servers.values():
            server.stop()
    comparisons = {load: compare(load, results[load]) for load in loads}
    print_vs_vllm(results, comparisons)
    return {
        "mode": "vs-vllm",
        "target": {"min_tokens_ratio": MIN_TOKENS_RATIO, "max_latency_ratio": MAX_LATENCY_RATIO},
        "servers": {name: {"command": s.command, "log": str(s.log_path)} for name, s in servers.items()},
        "loads": {
            load: {
                "image_every": LOADS[load],
                "levels": [asdict(result) for result in results[load]],
                "comparison": [asdict(comparison) for comparison in comparisons[load]],
            }
            for load in loads
        },
    }


def ratio(mine: float | None, theirs: float | None) -> float | None:
    """mine / theirs, or None when either is missing or theirs is zero."""
    if mine is None or not theirs:
        return None
    return mine / theirs


@dataclass
class Comparison:
    """Ours against the peer at one load and concurrency level."""

    load: str
    concurrency: int
    tokens_ratio: float | None  # ours (vllm) / vllm serve
    latency_p95_ratio: float | None
    ttft_p95_ratio: float | None
    transformers_tokens_ratio: float | None  # ours (transformers) / vllm serve
    target_holds: bool
    misses: list[str] = field(default_factory=list)  # why the target does not hold


def compare_level(load: str, concurrency: int, peer: Any, ours: Any, transformers: Any | None) -> Comparison:
    tokens = ratio(ours.tokens_per_second, peer.tokens_per_second)
    latency = ratio(ours.latency_p95, peer.latency_p95)
    ttft = ratio(ours.ttft_p95, peer.ttft_p95)
    misses = []
    for label, value, holds in (
        ("tok/s", tokens, lambda v: v >= MIN_TOKENS_RATIO),
        ("p95 latency", latency, lambda v: v <= MAX_LATENCY_RATIO),
        ("p95 TTFT", ttft, lambda v: v <= MAX_LATENCY_RATIO),
    ):
        if value is None:
            misses.append(f"no {label}")
        elif not holds(value):
            misses.append(label)
    if ours.errors:
        misses.append(f"{ours.errors} errors")
    if peer.errors:
        misses.append(f"peer had {peer.errors} errors")
    return Comparison(
        load=load,
        concurrency=concurrency,
        tokens_ratio=tokens,
        latency_p95_ratio=latency,
        ttft_p95_ratio=ttft,
        transformers_tokens_ratio=ratio(transformers.tokens_per_second, peer.tokens_per_second)
        if transformers is not None
        else None,
        target_holds=not misses,
        misses=misses,
    )


def compare(load: str, results: Sequence[Any]) -> list[Comparison]:
    """One comparison per concurrency level at which both the peer and ours (vllm) ran."""
    by_level: dict[int, dict[str, Any]] = {}
    for result in results:
        by_level.setdefault(result.concurrency, {})[result.server] = result
    return [
        compare_level(load, level, runs[PEER], runs[OURS_VLLM], runs.get(OURS_TRANSFORMERS))
        for level, runs in sorted(by_level.items())
        if PEER in runs and OURS_VLLM in runs
    ]


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def format_load(load: str, results: Sequence[Any], comparisons: Sequence[Comparison]) -> list[str]:
    """The table of one load: each server's numbers per level, then the ratios and the target."""
    lines = [
        f"\n=== load: {load} ({LOAD_TITLES.get(load, load)}) ===",
        f"{'clients':>7}  {'server':<22}{'tok/s':>9}{'p95 lat':>10}{'p95 ttft':>10}{'errors':>8}{'RSS MiB':>10}",
    ]
    order = {name: index for index, name in enumerate(SERVERS)}
    for result in sorted(results, key=lambda r: (r.concurrency, order.get(r.server, len(order)))):
        rss = "-" if result.rss_after_mib is None else f"{result.rss_after_mib:.0f}"
        lines.append(
            f"{result.concurrency:>7}  {result.server:<22}{result.tokens_per_second:>9.1f}"
            f"{_s(result.latency_p95):>10}{_s(result.ttft_p95):>10}{result.errors:>8}{rss:>10}"
        )
    lines += [
        f"ratios to {PEER}; target for {OURS_VLLM}: tok/s >= {MIN_TOKENS_RATIO}x, p95 latency and TTFT "
        + f"<= {MAX_LATENCY_RATIO}x",
        f"{'':>9}{'-- ' + OURS_VLLM + ' --':^29}{OURS_TRANSFORMERS:>21}",
        f"{'clients':>7}  {'tok/s':>9}{'p95 lat':>10}{'p95 ttft':>10}{'tok/s':>21}  target",
    ]
    for c in comparisons:
        target = "holds" if c.target_holds else "MISSED: " + ", ".join(c.misses)
        lines.append(
            f"{c.concurrency:>7}  {_x(c.tokens_ratio):>9}{_x(c.latency_p95_ratio):>10}{_x(c.ttft_p95_ratio):>10}"
            f"{_x(c.transformers_tokens_ratio):>21}  {target}"
        )
    return lines


def format_summary(comparisons: Sequence[Comparison]) -> str:
    held = sum(c.target_holds for c in comparisons)
    verdict = "target holds everywhere" if comparisons and held == len(comparisons) else "target missed somewhere"
    return f"\n{OURS_VLLM} vs {PEER}: {held} of {len(comparisons)} (load, clients) points within target ({verdict})"


def print_vs_vllm(results: dict[str, Sequence[Any]], comparisons: dict[str, Sequence[Comparison]]) -> None:
    for load, load_results in results.items():
        print("\n".join(format_load(load, load_results, comparisons.get(load, []))))
    print(format_summary([c for load in results for c in comparisons.get(load, [])]))
