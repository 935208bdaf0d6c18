"""Our settings and requests in vLLM's terms: engine arguments, sampling parameters, and whether vLLM can
serve a checkpoint at all. Plain dicts and functions, so they are tested where vLLM is not installed."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from backend.engines.requests import SamplingParams
from backend.settings import Settings

logger = logging.getLogger(__name__)

SEED_MODULUS = 2**64  # the seed range a torch generator takes; seed + choice index is folded into it


def vllm_installed() -> bool:
    """Whether `import vllm` would find it (without paying for the import)."""
    return importlib.util.find_spec("vllm") is not None


def engine_arguments(settings: Settings, checkpoint: str, max_model_len: int) -> dict[str, Any]:
    """`AsyncEngineArgs` keyword arguments for MODEL_ID as the settings ask.

    Images arrive already resized by our rule (media/resize.py), each prompt carrying its own pixel bounds,
    so vLLM's processor keeps them as they are and its image token counts are ours.
    """
    arguments: dict[str, Any] = {
        "model": checkpoint,
        "served_model_name": settings.model_name,
        "tokenizer": checkpoint,
        "dtype": settings.dtype,
        "max_model_len": max_model_len,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "enable_prefix_caching": settings.enable_prefix_caching,
        "max_num_seqs": settings.max_batch_size,
        "load_format": settings.load_format,
        "seed": 0,
        "disable_log_stats": False,  # our stat logger reads KV-cache use and queue lengths from these
        "enforce_eager": settings.enforce_eager,
        # Images only: with no video budget vLLM neither profiles nor reserves memory for a video at start.
        "limit_mm_per_prompt": {"image": settings.max_images_per_request, "video": 0},
        "mm_processor_kwargs": {"min_pixels": settings.min_pixels, "max_pixels": settings.max_pixels},
    }
    if settings.model_revision:
        arguments["revision"] = settings.model_revision
    if settings.hub_cache_dir is not None:
        arguments["download_dir"] = str(settings.hub_cache_dir)
    if settings.speculative_config:
        arguments["speculative_config"] = settings.speculative_config
    return arguments


def sampling_arguments(params: SamplingParams, eos_token_ids: frozenset[int]) -> dict[str, Any]:
    """`vllm.SamplingParams` keyword arguments with the meaning every field has on the transformers engine:
    delta outputs, stop strings cut from the answer, the checkpoint's end tokens, seeds folded to 64 bits."""
    return {
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "min_p": params.min_p,
        "repetition_penalty": params.repetition_penalty,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "stop": list(params.stop),
        # vLLM's ignore_eos ignores only the tokenizer's end token; our end tokens must go too.
        "stop_token_ids": [] if params.ignore_eos else sorted(eos_token_ids),
        "ignore_eos": params.ignore_eos,
        "seed": params.seed % SEED_MODULUS if params.seed is not None else None,
        "skip_special_tokens": True,
        "include_stop_str_in_output": False,
    }


def ended_by_end_token(finish_reason: str | None, stop_reason: int | str | None) -> int:
    """1 when vLLM ended an answer on an end token (`stop` with no stop string): vLLM counts that token in
    the answer, the transformers engine and OpenAI do not, so it is taken off the usage. 0 otherwise."""
    return 1 if finish_reason == "stop" and not isinstance(stop_reason, str) else 0


def unsupported_reason(architecture: str) -> str | None:
    """Why vLLM cannot serve a checkpoint of this architecture (None: it can). Imports vLLM (seconds)."""
    if not vllm_installed():
        return "vLLM is not installed in this environment"
    from vllm import ModelRegistry

    if architecture not in ModelRegistry.get_supported_archs():
        return f"vLLM has no implementation of {architecture}"
    return None
