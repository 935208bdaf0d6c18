"""summary.md of a scripts/gpu_proof.sh run: the engines side by side, from their result.json files.

Used by `scripts/gpu_measure.py summary RESULTS`; kept apart so that the measuring module stays short.
"""

from __future__ import annotations

from typing import Any


def mib(values: list[int] | None) -> str:
    """GPU memory as 'total MiB', with the split per GPU when there are several."""
    if not values:
        return "-"
    total = f"{sum(values):,} MiB"
    return total if len(values) == 1 else f"{total} ({' + '.join(f'{value:,}' for value in values)})"


def seconds(value: float | None) -> str:
    """A duration in seconds, or '-'."""
    return "-" if value is None else f"{value:.3f} s"


def number(value: float | None, digits: int = 1) -> str:
    """A number with `digits` decimals, or '-'."""
    return "-" if value is None else f"{value:,.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def engine_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per measurement, one column per engine."""

    def row(label: str, read) -> list[str]:
        cells = []
        for result in results.values():
            try:
                cells.append(read(result))
            except (KeyError, TypeError, AttributeError):
                cells.append("-")  # that stage failed: its error is listed below the tables
        return [label, *cells]

    def answer(kind: str, field: str, result: dict) -> str:
        part = result[kind]
        if field == "decode_tokens_per_s":
            return number(part[field])
        return seconds(part[field])

    return [
        row("versions", lambda r: ", ".join(f"{name} {version}" for name, version in r["versions"].items()) or "-"),
        row("load until ready (warm-up included)", lambda r: seconds(r["load_seconds"])),
        row("GPU memory after load", lambda r: mib(r["memory_after_load_mib"])),
        row("GPU memory peak while loading", lambda r: mib(r["peak_memory_while_loading_mib"])),
        row("long request: prompt tokens (text alone)",
            lambda r: f"{r['long_request']['prompt_tokens']} ({r['long_request']['text_prompt_tokens']})"),
        row("long request: GPU memory peak", lambda r: mib(r["long_request"]["peak_memory_mib"])),
        row("long request: latency / TTFT",
            lambda r: f"{seconds(r['long_request']['latency_s'])} / {seconds(r['long_request']['ttft_s'])}"),
        *[row(f"{kind.split('_')[0]} answer, {label}", lambda r, kind=kind, field=field: answer(kind, field, r))
          for kind in ("text_answer", "image_answer")
          for label, field in (("latency (median)", "latency_s"), ("TTFT (median)", "ttft_s"),
                               ("decode tokens/s (median)", "decode_tokens_per_s"))],
        row("answer tokens (each run)",
            lambda r: " / ".join(str(r[kind]["completion_tokens"]) for kind in ("text_answer", "image_answer"))),
    ]


def bench_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """scripts/bench.py's levels of every engine."""
    rows = []
    for engine, result in results.items():
        for level in result.get("bench") or []:
            rows.append([engine, str(level["concurrency"]), number(level["requests_per_second"], 2),
                         number(level["tokens_per_second"]), seconds(level["latency_p50"]),
                         seconds(level["latency_p95"]), seconds(level["ttft_p50"]), seconds(level["ttft_p95"]),
                         str(level["errors"])])
    return rows


def summary_markdown(results: dict[str, dict[str, Any]], machine: str = "") -> str:
    """The whole summary: the machine, the measurements per engine, the bench levels, the failures."""
    lines = ["# GPU proof: the full-size ShizhenGPT-32B-VL architecture (LOAD_FORMAT=dummy: random weights)", ""]
    if machine.strip():
        lines += ["```", machine.strip(), "```", ""]
    if not results:
        return "\n".join([*lines, "No engine was measured (no result.json).", ""])
    settings = next((result["settings"] for result in results.values() if result.get("settings")), {})
    lines += [f"MAX_MODEL_LEN={settings.get('MAX_MODEL_LEN', '?')}; answers are streamed with ignore_eos; "
              "TTFT is the time to the first chunk with content; GPU memory is nvidia-smi's memory.used.", ""]
    lines += table(["measured", *results], engine_rows(results)) + [""]
    bench = bench_rows(results)
    if bench:
        lines += ["## scripts/bench.py (closed loop, 64 tokens per answer, every 4th request with an image)", ""]
        header = ["engine", "clients", "req/s", "tokens/s", "latency p50", "latency p95", "TTFT p50", "TTFT p95",
                  "errors"]
        lines += table(header, bench) + [""]
    errors = [(engine, error) for engine, result in results.items() for error in result.get("errors", [])]
    if errors:
        lines += ["## Failed stages", ""] + [f"- {engine}: {error}" for engine, error in errors] + [""]
    return "\n".join(lines)
