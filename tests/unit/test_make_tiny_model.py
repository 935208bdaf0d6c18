"""The tiny checkpoint: deterministic bytes, real Qwen2.5-VL pieces, loadable by the Auto classes."""

import hashlib

import make_tiny_model
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer


def digest(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def test_same_bytes_on_every_run(tiny_vl_dir, tmp_path):
    make_tiny_model.main(["--out", str(tmp_path / "again")])
    assert digest(tmp_path / "again") == digest(tiny_vl_dir)


def test_checkpoint_has_the_files_of_a_hub_model(tiny_vl_dir):
    names = {path.name for path in tiny_vl_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "chat_template.json",
    } <= names


def test_config_tokenizer_and_processor_are_qwen2_5_vl(tiny_vl_dir):
    config = AutoConfig.from_pretrained(tiny_vl_dir)
    assert config.model_type == "qwen2_5_vl"
    tokenizer = AutoTokenizer.from_pretrained(tiny_vl_dir)
    for token in make_tiny_model.SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, token
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == config.image_token_id
    assert config.text_config.vocab_size >= len(tokenizer)
    text = "舌苔薄白 tongue coating"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    processor = AutoImageProcessor.from_pretrained(tiny_vl_dir)
    assert processor.merge_size == 2 and processor.patch_size == 14
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "看"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>看<|im_end|>\n<|im_start|>assistant\n"
    )


def test_text_only_flavour_is_a_qwen2_causal_lm(tiny_text_dir):
    config = AutoConfig.from_pretrained(tiny_text_dir)
    assert config.model_type == "qwen2"
    assert not (tiny_text_dir / "preprocessor_config.json").exists()
