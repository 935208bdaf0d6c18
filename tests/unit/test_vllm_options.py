"""Our settings and sampling in vLLM's terms, and the ENGINE=auto choice: checked without vLLM installed
(the end-to-end tests in tests/e2e/test_engines.py run the real thing from .venv-vllm)."""

from __future__ import annotations

import json

import pytest

from backend.engines import choose_engine, create_engine
from backend.engines.requests import SamplingParams
from backend.engines.vllm_engine import options
from backend.engines.vllm_engine.options import (
    SEED_MODULUS,
    ended_by_end_token,
    engine_arguments,
    sampling_arguments,
)
from tests.conftest import make_settings


def test_engine_arguments_follow_the_settings(tiny_vl_dir):
    settings = make_settings(
        tiny_vl_dir,
        gpu_memory_utilization=0.85,
        tensor_parallel_size=2,
        enable_prefix_caching=False,
        speculative_config=json.dumps({"method": "ngram", "num_speculative_tokens": 3}),
        max_batch_size=48,
        max_images_per_request=3,
        load_format="dummy",
        enforce_eager=True,
        hf_home="/workspace/models",
    )
    arguments = engine_arguments(settings, "/ckpt", 4096)
    assert arguments["model"] == "/ckpt" and arguments["max_model_len"] == 4096
    assert arguments["gpu_memory_utilization"] == 0.85 and arguments["tensor_parallel_size"] == 2
    assert arguments["enable_prefix_caching"] is False and arguments["enforce_eager"] is True
    assert arguments["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 3}
    assert arguments["max_num_seqs"] == 48 and arguments["load_format"] == "dummy"
    assert arguments["limit_mm_per_prompt"] == {"image": 3, "video": 0}
    assert arguments["mm_processor_kwargs"] == {"min_pixels": settings.min_pixels, "max_pixels": settings.max_pixels}
    assert arguments["download_dir"] == "/workspace/models/hub"
    assert "speculative_config" not in engine_arguments(make_settings(tiny_vl_dir), "/ckpt", 4096)


def test_sampling_keeps_every_meaning():
    params = SamplingParams(
        max_new_tokens=50,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        min_p=0.05,
        repetition_penalty=1.05,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        stop=("。", "\n\n"),
        seed=2**64 + 5,  # seed + choice index may pass 64 bits: folded as on the transformers engine
    )
    arguments = sampling_arguments(params, frozenset({151645, 151643}))
    assert arguments == {
        "max_tokens": 50,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.05,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "stop": ["。", "\n\n"],
        "stop_token_ids": [151643, 151645],
        "ignore_eos": False,
        "seed": 5,
        "skip_special_tokens": True,
        "include_stop_str_in_output": False,
    }
    assert SEED_MODULUS == 2**64


@pytest.mark.parametrize(("seed", "folded"), [(-1, 2**64 - 1), (-(2**63), 2**63), (0, 0), (2**64 + 3, 3)])
def test_negative_seeds_stay_seeds(seed, folded):
    """vLLM reads -1 as "no seed": a request's -1 must be a seed like any other (folded as the transformers
    engine folds it)."""
    assert sampling_arguments(SamplingParams(max_new_tokens=1, seed=seed), frozenset())["seed"] == folded


@pytest.mark.parametrize(
    ("finish_reason", "stop_reason", "taken_off"),
    [("stop", None, 1), ("stop", 151645, 1), ("stop", "。", 0), ("length", None, 0), ("abort", None, 0)],
)
def test_the_end_token_is_not_counted_in_the_answer(finish_reason, stop_reason, taken_off):
    assert ended_by_end_token(finish_reason, stop_reason) == taken_off


def test_no_top_k_and_ignore_eos_in_vllm_terms():
    arguments = sampling_arguments(SamplingParams(max_new_tokens=8, ignore_eos=True), frozenset({7}))
    assert arguments["top_k"] == -1 and arguments["seed"] is None
    # vLLM's ignore_eos ignores the tokenizer's end token only: the checkpoint's others must not stop it.
    assert arguments["ignore_eos"] is True and arguments["stop_token_ids"] == []


def test_auto_without_vllm_installed_picks_transformers_and_says_why(tiny_vl_dir, monkeypatch):
    monkeypatch.setattr(options, "vllm_installed", lambda: False)
    assert choose_engine(make_settings(tiny_vl_dir)) == (
        "transformers",
        "ENGINE=auto: vLLM is not installed in this environment",
    )
    engine = create_engine(make_settings(tiny_vl_dir))
    assert engine.name == "transformers" and engine.report().details["engine_reason"].startswith("ENGINE=auto")


def test_auto_with_vllm_follows_the_checkpoints_architecture(tiny_vl_dir, tiny_text_dir, monkeypatch):
    monkeypatch.setattr(options, "vllm_installed", lambda: True)
    supported = {"Qwen2_5_VLForConditionalGeneration"}
    def unsupported(architecture: str) -> str | None:
        return None if architecture in supported else f"vLLM has no implementation of {architecture}"

    monkeypatch.setattr(options, "unsupported_reason", unsupported)
    assert choose_engine(make_settings(tiny_vl_dir)) == (
        "vllm",
        "ENGINE=auto: vLLM is installed and implements Qwen2_5_VLForConditionalGeneration",
    )
    assert choose_engine(make_settings(tiny_text_dir)) == (
        "transformers",
        "ENGINE=auto: vLLM has no implementation of Qwen2ForCausalLM",
    )


@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_an_explicit_engine_is_taken_as_set(tiny_vl_dir, engine):
    assert choose_engine(make_settings(tiny_vl_dir, engine=engine)) == (engine, f"ENGINE={engine}")


def test_bad_engine_settings_name_the_variable(tiny_vl_dir):
    from pydantic import ValidationError

    from backend.settings import describe_settings_error

    for overrides, variable in [
        ({"engine": "tgi"}, "ENGINE"),
        ({"gpu_memory_utilization": 1.5}, "GPU_MEMORY_UTILIZATION"),
        ({"tensor_parallel_size": 0}, "TENSOR_PARALLEL_SIZE"),
        ({"speculative_config": "[1, 2"}, "SPECULATIVE_CONFIG"),
        ({"cpu_kv_cache_gib": 0}, "CPU_KV_CACHE_GIB"),
    ]:
        with pytest.raises(ValidationError) as failure:
            make_settings(tiny_vl_dir, **overrides)
        assert f"  {variable}:" in describe_settings_error(failure.value)
