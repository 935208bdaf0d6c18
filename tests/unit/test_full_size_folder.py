"""`make_tiny_model.py --size full`: the 32B-VL architecture without weights, ready for LOAD_FORMAT=dummy."""

import json

import capacity
import full_size
import make_tiny_model
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from backend.engines.requests import ChatTurn
from backend.engines.transformers_engine.prompt import PromptBuilder
from backend.media.resize import PixelBounds


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "shizhengpt-32b-vl-architecture"
    make_tiny_model.main(["--out", str(out), "--size", "full"])
    return out


def test_the_repositorys_copy_of_the_config_is_the_shared_one():
    if not full_size.SHARED_CONFIG.exists():
        pytest.skip("../shared/data is not beside this checkout")
    assert full_size.FULL_SIZE_CONFIG.read_bytes() == full_size.SHARED_CONFIG.read_bytes()


def test_the_config_is_the_full_size_one_and_no_weights_are_written(folder):
    written = json.loads((folder / "config.json").read_text())
    shared = json.loads(full_size.FULL_SIZE_CONFIG.read_text())
    shared.pop("_comment")
    assert written == shared
    assert not list(folder.glob("*.safetensors"))


def test_the_model_it_describes_has_33_billion_parameters(folder):
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = AutoModelForImageTextToText.from_config(config)
    count = sum(parameter.numel() for parameter in model.parameters())
    assert count == capacity.capacity(json.loads((folder / "config.json").read_text())).parameters
    assert round(count / 1e9, 2) == 33.45


def test_the_tokenizer_covers_the_vocabulary_with_qwens_special_ids(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == 151_665  # the embedding's 152,064 rows leave room, as in the real checkpoint
    config = json.loads((folder / "config.json").read_text())
    for token, name in [("<|endoftext|>", "bos_token_id"), ("<|im_end|>", "eos_token_id"),
                        ("<|image_pad|>", "image_token_id"), ("<|vision_start|>", "vision_start_token_id")]:
        assert tokenizer.convert_tokens_to_ids(token) == config[name]
    assert tokenizer.convert_tokens_to_ids("<|file_sep|>") == 151_664
    text = "舌质淡红，苔薄白。The tongue is pale."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and max(ids) < 151_643


def test_the_server_builds_prompts_for_it(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    builder = PromptBuilder(tokenizer, tokenizer.chat_template, AutoImageProcessor.from_pretrained(folder), 151655)
    inputs = builder.build(
        [ChatTurn("user", [Image.new("RGB", (420, 360)), "请分析舌象"], image_sources=["m0"])],
        PixelBounds(3136, 360 * 420),
    )
    assert inputs.image_token_counts == [15 * 12]  # 420x360 within MAX_PIXELS: 15 x 12 blocks of 28
    assert inputs.prompt_tokens > 15 * 12
