"""Write a small, deterministic, randomly initialised Qwen2.5-VL (or Qwen2) checkpoint.

No model hub is reachable where this project is built and tested, so tests, benchmarks and the offline demo
load a checkpoint made here. It has the real architecture and file layout of `FreedomIntelligence/ShizhenGPT-32B-VL`
(a `Qwen2_5_VLConfig`, safetensors weights, `generation_config.json`, a byte-level BPE tokenizer with every
Qwen2.5-VL special token, a Qwen2.5-VL chat template and a Qwen2-VL image processor), only with small
dimensions, so `from_pretrained(DIR)` loads it through exactly the code path that loads the real model.

Usage:
    python scripts/make_tiny_model.py --out DIR [--size tiny|small|bench] [--text-only]
    python scripts/make_tiny_model.py --out DIR --size full   # the 32B-VL architecture, no weights

The same arguments write the same bytes on every run (fixed seed, fixed corpus, no timestamps).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# The special tokens of Qwen2.5-VL, in the order the real tokenizer numbers them (151643 onwards there).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Added tokens that Qwen2.5's tokenizer does not mark special (151657 onwards there): tool calls and
# fill-in-the-middle. A tokenizer matches them in any text unless told otherwise, which the server must do.
PLAIN_ADDED_TOKENS = [
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# A Qwen2.5-VL style chat template: a default system turn when the conversation has none, one
# `<|vision_start|><|image_pad|><|vision_end|>` placeholder per image part (the processor widens the pad to
# the image's token count), and an open assistant turn when `add_generation_prompt` is set.
VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in part %}"
    "{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

# The Qwen2.5 text-only template (the shape of ShizhenGPT-32B-LLM): same turns, no image placeholders.
TEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if 'text' in part %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the BPE merges are learned from: Chinese TCM vocabulary (what ShizhenGPT is asked about) and English.
# Any other text still encodes, byte by byte, because the alphabet is all 256 bytes.
CORPUS = """
中医诊断讲究望闻问切四诊合参。舌诊是望诊的重要部分，观察舌质、舌苔、舌形和舌态。
舌质淡红，舌苔薄白，为正常舌象。舌质红绛，多属热证；舌质淡白，多属气血两虚。
舌苔黄腻，提示湿热内蕴；舌苔白厚，多为寒湿或食积。舌体胖大有齿痕，多见于脾虚湿盛。
面诊观察面色：面色萎黄多为脾虚，面色潮红多为阴虚火旺，面色苍白多为气血不足。
脉象有浮、沉、迟、数、滑、涩、弦、细等。浮脉主表证，沉脉主里证，数脉主热证，迟脉主寒证。
中药有人参、黄芪、当归、白术、茯苓、甘草、川芎、熟地黄、白芍、柴胡、黄连、金银花、连翘、枸杞子。
四君子汤由人参、白术、茯苓、甘草组成，功能益气健脾。六味地黄丸滋阴补肾。
小柴胡汤和解少阳。补中益气汤补中益气，升阳举陷。逍遥散疏肝解郁，养血健脾。
阴阳五行学说是中医理论的基础。脏腑包括心、肝、脾、肺、肾和胆、胃、小肠、大肠、膀胱、三焦。
气血津液是构成人体和维持生命活动的基本物质。经络是运行气血的通道。
请根据舌象分析体质，并给出饮食和生活建议。本回答仅供参考，不能代替医生的诊断。
你好！我是时珍GPT，一个中医大模型。请问有什么可以帮您？
Traditional Chinese Medicine (TCM) diagnosis combines inspection, listening, inquiry and palpation.
The tongue body is pale red with a thin white coating, which is a normal tongue.
A red tongue with a yellow greasy coating suggests damp heat. Tooth marks suggest spleen deficiency.
Please describe the image. What herb is this? Ginseng, astragalus, angelica, licorice and goji berry.
You are a helpful assistant. Hello! How can I help you today? This is not a medical diagnosis.
The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } , . ; : ! ? " '
"""


@dataclass(frozen=True)
class Dimensions:
    """The sizes of one checkpoint flavour: `tiny` for tests, `small` for vLLM tests, `bench` for benchmarks."""

    vocab_merges: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vision_depth: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_num_heads: int


SIZES = {
    # Loads in a fraction of a second; a decode step is dominated by Python overhead.
    "tiny": Dimensions(
        vocab_merges=1500,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vision_depth=2,
        vision_hidden_size=32,
        vision_intermediate_size=64,
        vision_num_heads=2,
    ),
    # The tiny model with vLLM's smallest attention head (64; its CPU kernels refuse 16): the vLLM engine's
    # end-to-end tests run on it, and vLLM starts on it in well under a minute.
    "small": Dimensions(
        vocab_merges=1500,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vision_depth=2,
        vision_hidden_size=64,
        vision_intermediate_size=128,
        vision_num_heads=1,
    ),
    # Tens of millions of parameters: on CPU the matrix arithmetic dominates a decode step, as it does on a
    # GPU with the real model, so batching and scheduling effects show in benchmarks.
    "bench": Dimensions(
        vocab_merges=3000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        vision_depth=4,
        vision_hidden_size=256,
        vision_intermediate_size=512,
        vision_num_heads=4,
    ),
}

SEED = 1234


def train_tokenizer(num_merges: int, text_only: bool, model_max_length: int, vocabulary_size: int | None = None):
    """Learn a byte-level BPE on CORPUS with Qwen2's pre-tokenizer, and wrap it as a `Qwen2Tokenizer`; with
    `vocabulary_size`, filled up to that many regular tokens (the full-size model's 151,643)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + num_merges,
        initial_alphabet=alphabet,
        show_progress=False,
        min_frequency=1,
    )
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    bpe.train_from_iterator(lines, trainer=trainer)
    model_state = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = model_state["vocab"]
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in model_state["merges"]]
    if vocabulary_size is not None:
        from full_size import fill_vocabulary

        vocab = dict(vocab)
        fill_vocabulary(vocab, merges, vocabulary_size)

    special = [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    vocab = dict(vocab)
    for token in SPECIAL_TOKENS:  # Special tokens follow the regular vocabulary, as in Qwen's tokenizer.
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=model_max_length,
        chat_template=TEXT_CHAT_TEMPLATE if text_only else VL_CHAT_TEMPLATE,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in PLAIN_ADDED_TOKENS])
    return tokenizer


def text_config_kwargs(dims: Dimensions, vocab_size: int, token_ids: dict[str, int]) -> dict:
    """Keyword arguments of the language model's config, shared by the VL and text-only flavours."""
    head_dim = dims.hidden_size // dims.num_attention_heads
    return {
        "vocab_size": vocab_size,
        "hidden_size": dims.hidden_size,
        "intermediate_size": dims.intermediate_size,
        "num_hidden_layers": dims.num_hidden_layers,
        "num_attention_heads": dims.num_attention_heads,
        "num_key_value_heads": dims.num_key_value_heads,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "head_dim": head_dim,
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "pad_token_id": token_ids["<|endoftext|>"],
        "tie_word_embeddings": False,
    }


def build_config(dims: Dimensions, vocab_size: int, token_ids: dict[str, int], text_only: bool):
    """A `Qwen2Config` (text-only) or `Qwen2_5_VLConfig` with the given dimensions and token ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2Config

    text_kwargs = text_config_kwargs(dims, vocab_size, token_ids)
    if text_only:
        return Qwen2Config(**text_kwargs, rope_theta=1_000_000.0)
    half_head = text_kwargs["head_dim"] // 2
    # mrope splits each rotary half over (temporal, height, width); the real 32B uses [16, 24, 24] of 64.
    temporal = half_head // 4
    spatial = (half_head - temporal) // 2
    mrope_section = [temporal + (half_head - temporal) % 2, spatial, spatial]
    text_config = dict(
        text_kwargs,
        model_type="qwen2_5_vl_text",
        rope_scaling={"type": "mrope", "mrope_section": mrope_section, "rope_theta": 1_000_000.0},
    )
    vision_config = {
        "depth": dims.vision_depth,
        "hidden_size": dims.vision_hidden_size,
        "intermediate_size": dims.vision_intermediate_size,
        "num_heads": dims.vision_num_heads,
        "out_hidden_size": dims.hidden_size,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [dims.vision_depth - 1],
        "tokens_per_second": 2,
        "hidden_act": "silu",
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=False,
        architectures=["Qwen2_5_VLForConditionalGeneration"],
    )


def write_checkpoint(out: Path, size: str, text_only: bool) -> None:
    """Write the whole checkpoint into `out` (replacing what was there)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

    dims = SIZES[size]
    tokenizer = train_tokenizer(dims.vocab_merges, text_only, model_max_length=32768)
    token_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    # Round the embedding up to a multiple of 64, as real checkpoints do (Qwen pads 151665 to 152064).
    vocab_size = (len(tokenizer) + 63) // 64 * 64
    config = build_config(dims, vocab_size, token_ids, text_only)

    torch.manual_seed(SEED)
    model_class = AutoModelForCausalLM if text_only else AutoModelForImageTextToText
    model = model_class.from_config(config, dtype=torch.float32)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=token_ids["<|endoftext|>"],
        pad_token_id=token_ids["<|endoftext|>"],
        eos_token_id=[token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.05,
    )

    # Write into a fresh temporary folder, then swap it in, so a failed run never leaves half a checkpoint.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-model-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        if text_only:
            tokenizer.save_pretrained(staging)
        else:
            save_processor(staging, tokenizer)
        staging.chmod(0o755)  # mkdtemp makes it private; a checkpoint is ordinary readable data.
        for path in staging.iterdir():
            path.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def save_processor(out: Path, tokenizer) -> None:
    """Save what a Qwen2.5-VL processor is made of: the image processor, the tokenizer, the chat template.

    The files are those of the real checkpoints (`preprocessor_config.json` naming `Qwen2VLImageProcessor` and
    `Qwen2_5_VLProcessor`, `chat_template.json`, the tokenizer files). They are written part by part because
    transformers' `Qwen2_5_VLProcessor` also wants a video processor, which needs torchvision, and there is no
    CPU build of torchvision to install here; the server never needs the video processor.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    image_processor.save_pretrained(out)
    preprocessor_path = out / "preprocessor_config.json"
    preprocessor = json.loads(preprocessor_path.read_text())
    preprocessor["image_processor_type"] = "Qwen2VLImageProcessor"
    preprocessor["processor_class"] = "Qwen2_5_VLProcessor"
    preprocessor["min_pixels"] = 56 * 56
    preprocessor["max_pixels"] = 28 * 28 * 1280
    preprocessor_path.write_text(json.dumps(preprocessor, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": VL_CHAT_TEMPLATE}, indent=2) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write the checkpoint into")
    parser.add_argument(
        "--size",
        choices=[*sorted(SIZES), "full"],
        default="tiny",
        help="tiny (tests), bench (benchmarks), or full: the 32B-VL architecture without weights (LOAD_FORMAT=dummy)",
    )
    parser.add_argument("--text-only", action="store_true", help="write a Qwen2 causal LM (no vision tower)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: write the checkpoint and say where it is."""
    args = parse_args(argv)
    if args.size == "full":
        from full_size import write_full_size_folder

        write_full_size_folder(args.out.resolve(), train_tokenizer, save_processor, SPECIAL_TOKENS, PLAIN_ADDED_TOKENS)
        print(f"wrote the full-size Qwen2.5-VL-32B architecture (no weights) to {args.out}", file=sys.stderr)
        return 0
    write_checkpoint(args.out.resolve(), args.size, args.text_only)
    kind = "Qwen2 causal LM" if args.text_only else "Qwen2.5-VL"
    print(f"wrote a {args.size} {kind} checkpoint to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
