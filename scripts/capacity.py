"""How many conversations fit: weights, KV cache per token, and concurrent sequences on given GPUs.

    python scripts/capacity.py                                   # ShizhenGPT-32B-VL (../shared/data config)
    python scripts/capacity.py --config MODEL/config.json --gpus 2 --gpu-memory-gib 80 --context 4096

Counts the parameters of a Qwen2.5-VL (or Qwen2) config exactly as transformers builds the model, so weight
bytes need no download; the KV cache per token is 2 (keys and values) x layers x KV heads x head size x bytes.
With tensor parallelism each GPU holds 1/N of the weights and of every token's KV cache. What the engine
reserves besides (activations, the vision tower's peak, CUDA graphs) is an assumption, `--reserve-gib`.
docs/capacity.md has the figures and how they were checked against vLLM.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from full_size import FULL_SIZE_CONFIG  # scripts/ is on the path when a script runs

GIB = 2**30
A100_80GB_GIB = 79.2  # what CUDA reports as the total of an "80 GB" A100 (vLLM budgets a share of this)
VLLM_UTILIZATION = 0.92  # vLLM 0.32's default gpu_memory_utilization
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Capacity:
    """The figures for one model on one set of GPUs."""

    text_parameters: int
    vision_parameters: int
    weight_bytes_per_gpu: float
    kv_bytes_per_token: int  # the whole model's, summed over the GPUs
    kv_budget_bytes_per_gpu: float
    kv_tokens: int  # tokens the KV cache holds (each token spread over the GPUs)
    conversations: int  # concurrent sequences of `context` tokens

    @property
    def parameters(self) -> int:
        """All parameters, text and vision."""
        return self.text_parameters + self.vision_parameters


def text_parameters(text: dict) -> int:
    """Parameters of a Qwen2 decoder: embeddings, layers (q/k/v with biases, o, SwiGLU MLP, two norms), the
    final norm, and the LM head unless tied."""
    hidden, inter, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    heads, kv_heads, vocab = text["num_attention_heads"], text["num_key_value_heads"], text["vocab_size"]
    head = text.get("head_dim") or hidden // heads
    attention = hidden * heads * head + heads * head + 2 * (hidden * kv_heads * head + kv_heads * head)
    attention += heads * head * hidden  # output projection, no bias
    mlp = 3 * hidden * inter
    per_layer = attention + mlp + 2 * hidden
    head_weights = 0 if text.get("tie_word_embeddings") else vocab * hidden
    return vocab * hidden + layers * per_layer + hidden + head_weights


def vision_parameters(vision: dict, channels: int = 3) -> int:
    """Parameters of Qwen2.5-VL's vision tower: patch embedding, blocks (qkv, projection, SwiGLU MLP with
    biases, two RMS norms), and the patch merger that maps 2x2 patches into the text's hidden size."""
    hidden, inter, depth = vision["hidden_size"], vision["intermediate_size"], vision["depth"]
    patch, temporal = vision["patch_size"], vision.get("temporal_patch_size", 2)
    merged = hidden * vision.get("spatial_merge_size", 2) ** 2
    embed = channels * temporal * patch * patch * hidden
    block = (hidden * 3 * hidden + 3 * hidden) + (hidden * hidden + hidden) + 3 * (hidden * inter) + 2 * inter + hidden
    block += 2 * hidden
    merger = hidden + (merged * merged + merged) + (merged * vision["out_hidden_size"] + vision["out_hidden_size"])
    return embed + depth * block + merger


def kv_bytes_per_token(text: dict, dtype_bytes: int) -> int:
    """Keys and values of one token over all layers."""
    head = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    return 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * head * dtype_bytes


def capacity(
    config: dict,
    gpus: int = 1,
    gpu_memory_gib: float = A100_80GB_GIB,
    utilization: float = VLLM_UTILIZATION,
    reserve_gib: float = 3.0,
    context: int = 4096,
    dtype: str | None = None,
) -> Capacity:
    """The figures for `config` on `gpus` GPUs of `gpu_memory_gib` each, with tensor parallelism over all."""
    text = config.get("text_config", config)
    dtype_bytes = DTYPE_BYTES[dtype or config.get("torch_dtype") or text.get("torch_dtype") or "bfloat16"]
    text_count = text_parameters(text)
    vision_count = vision_parameters(config["vision_config"]) if "vision_config" in config else 0
    weights = (text_count + vision_count) * dtype_bytes / gpus
    budget = gpu_memory_gib * GIB * utilization - weights - reserve_gib * GIB
    per_token = kv_bytes_per_token(text, dtype_bytes)
    tokens = max(0, math.floor(budget / (per_token / gpus)))
    return Capacity(text_count, vision_count, weights, per_token, budget, tokens, tokens // context)


def main(argv: list[str] | None = None) -> int:
    """Print the figures for one configuration."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=FULL_SIZE_CONFIG, help="a config.json")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs, with tensor parallelism over all of them")
    parser.add_argument(
        "--gpu-memory-gib", type=float, default=A100_80GB_GIB, help="one GPU's total as CUDA reports it (A100 80GB)"
    )
    parser.add_argument(
        "--utilization", type=float, default=VLLM_UTILIZATION, help="share the engine may use (vLLM's default)"
    )
    parser.add_argument("--reserve-gib", type=float, default=3.0, help="activations, vision peak, CUDA graphs")
    parser.add_argument("--context", type=int, default=4096, help="tokens of one conversation")
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), help="default: the config's torch_dtype")
    args = parser.parse_args(argv)
    config = json.loads(args.config.read_text())
    result = capacity(
        config, args.gpus, args.gpu_memory_gib, args.utilization, args.reserve_gib, args.context, args.dtype
    )
    print(f"parameters: {result.parameters / 1e9:.2f} B (text {result.text_parameters / 1e9:.2f} B, "
          f"vision {result.vision_parameters / 1e9:.3f} B)")
    print(f"weights per GPU: {result.weight_bytes_per_gpu / GIB:.1f} GiB")
    print(f"KV cache per token: {result.kv_bytes_per_token / 1024:.0f} KiB "
          f"({result.kv_bytes_per_token / args.gpus / 1024:.0f} KiB on each GPU)")
    print(f"KV cache budget per GPU: {result.kv_budget_bytes_per_gpu / GIB:.1f} GiB = {result.kv_tokens:,} tokens")
    print(f"concurrent {args.context}-token conversations: {result.conversations}")
    return 0 if result.kv_tokens > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
