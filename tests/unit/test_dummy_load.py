"""LOAD_FORMAT=dummy: the architecture with random weights, from a folder that has no weights at all."""

import shutil

import torch

from backend.engines.requests import ChatTurn, SamplingParams
from backend.engines.transformers_engine.loader import hub_download_options, load_model
from tests.conftest import make_settings
from tests.helpers import loaded_engine


def weightless_copy(model_dir, tmp_path):
    out = tmp_path / "architecture-only"
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("*.safetensors"))
    return out


def test_a_folder_without_weights_loads_with_random_ones_on_the_device(tiny_vl_dir, tmp_path):
    folder = weightless_copy(tiny_vl_dir, tmp_path)
    loaded = load_model(make_settings(folder, load_format="dummy"))
    real = load_model(make_settings(tiny_vl_dir))
    assert loaded.parameter_count == real.parameter_count
    assert loaded.accepts_images and loaded.dtype == torch.float32 and str(loaded.device) == "cpu"
    weights = dict(loaded.model.named_parameters())
    name, reference = next(iter(real.model.named_parameters()))
    assert weights[name].shape == reference.shape and not torch.equal(weights[name], reference)
    again = load_model(make_settings(folder, load_format="dummy"))  # seeded: the same random model
    assert torch.equal(dict(again.model.named_parameters())[name], weights[name])


async def test_the_engine_serves_a_dummy_model(tiny_vl_dir, tmp_path):
    engine = await loaded_engine(weightless_copy(tiny_vl_dir, tmp_path), load_format="dummy")
    try:
        prompt = await engine.prepare([ChatTurn("user", ["你好"])])
        result = await engine.generate("r", prompt, SamplingParams(max_new_tokens=4, temperature=0)).collect()
        assert result.finish.completion_tokens == 4
    finally:
        await engine.shutdown()


def test_a_dummy_hub_model_downloads_no_weights():
    settings = make_settings("/nonexistent", model_id="FreedomIntelligence/ShizhenGPT-32B-VL", load_format="dummy")
    assert "*.safetensors" not in hub_download_options(settings)["allow_patterns"]
    assert "*.safetensors" in hub_download_options(make_settings("/x", model_id="org/model"))["allow_patterns"]
