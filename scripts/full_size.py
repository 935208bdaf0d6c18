"""`make_tiny_model.py --size full`: the ShizhenGPT-32B-VL architecture as a folder without weights.

The folder has the full-size config (`scripts/data/qwen2.5-vl-32b-config.json`, from `../shared/data/`), a
tokenizer whose ids cover the whole vocabulary (151,643 byte-level BPE tokens, then Qwen2.5's special and
added tokens at the same ids as the real tokenizer: `<|endoftext|>` 151643 ... `<|file_sep|>` 151664), the
image processor and the chat template. No weights: the engine creates them at random directly on the GPU
(`LOAD_FORMAT=dummy`), so a 64 GB model can be measured where the real one cannot be downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

# A copy of ../shared/data/qwen2.5-vl-32b-config.json kept in the repository, so that a pod, an image or a GPU
# machine without the shared folder has it (tests/unit/test_full_size_folder.py checks the two are the same).
FULL_SIZE_CONFIG = Path(__file__).resolve().parent / "data" / "qwen2.5-vl-32b-config.json"
SHARED_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "data" / "qwen2.5-vl-32b-config.json"
REGULAR_VOCABULARY = 151_643  # byte-level BPE tokens before the first special token, as in Qwen2.5


def fill_vocabulary(vocab: dict[str, int], merges: list[tuple[str, str]], size: int) -> None:
    """Add merges of existing tokens (in a fixed order) until the vocabulary has `size` tokens.

    Each new token is the concatenation of two existing ones, so the merge list stays a valid BPE; the
    tokens mean nothing, which a randomly initialised model does not mind.
    """
    alphabet = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1]) if len(token) == 1]
    layer = alphabet
    while len(vocab) < size:
        grown = []
        for left in layer:
            for right in alphabet:
                joined = left + right
                if joined in vocab:
                    continue
                vocab[joined] = len(vocab)
                merges.append((left, right))
                grown.append(joined)
                if len(vocab) == size:
                    return
        layer = grown


def write_full_size_folder(out: Path, train_tokenizer, save_processor, special_tokens, plain_tokens) -> None:
    """Write config, tokenizer, processor and generation config of the full-size model into `out`."""
    config = json.loads(FULL_SIZE_CONFIG.read_text())
    config.pop("_comment", None)
    tokenizer = train_tokenizer(500, False, model_max_length=config["text_config"]["max_position_embeddings"],
                                vocabulary_size=REGULAR_VOCABULARY)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in special_tokens + plain_tokens}
    expected = dict(zip(special_tokens + plain_tokens, range(REGULAR_VOCABULARY, REGULAR_VOCABULARY + len(ids))))
    if ids != expected:
        raise RuntimeError(f"the special tokens did not get Qwen2.5's ids: {ids}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_processor(out, tokenizer)
    generation = {
        "bos_token_id": 151643,
        "pad_token_id": 151643,
        "eos_token_id": [151645, 151643],
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.05,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
