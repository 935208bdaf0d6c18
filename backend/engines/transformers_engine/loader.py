"""Load a Qwen2.5-VL (image-text-to-text) or Qwen2 (causal LM) checkpoint with everything serving needs.

The same function loads the 64 GB `FreedomIntelligence/ShizhenGPT-32B-VL` from the hub cache and the tiny
test checkpoint from a folder: the model class follows the checkpoint's config, never its name.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    GenerationConfig,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from backend.engines.requests import GenerationDefaults
from backend.engines.transformers_engine.devices import (
    Hardware,
    max_memory_map,
    memory_report,
    resolve_dtype,
    uses_cuda,
)
from backend.settings import Settings

logger = logging.getLogger(__name__)

# What serving needs from a hub repository; other formats (.bin, .pth, original/) are never fetched.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


class ModelLoadError(Exception):
    """The checkpoint could not be found or loaded; the message says what to do."""


@dataclass
class LoadedModel:
    """A model ready to serve, with its tokenizer, image processor and the facts the API reports."""

    model: Any
    tokenizer: Any
    image_processor: Any | None
    chat_template: str
    checkpoint_dir: Path
    resolved_revision: str | None
    dtype: torch.dtype
    device: torch.device
    device_map: dict[str, Any] | str
    max_model_len: int
    eos_token_ids: frozenset[int]
    image_token_id: int | None
    generation_defaults: GenerationDefaults
    parameter_count: int
    load_seconds: float
    memory_after_load: dict = field(default_factory=dict)

    @property
    def accepts_images(self) -> bool:
        """Qwen2.5-VL checkpoints take images; text-only Qwen2 ones do not."""
        return self.image_processor is not None


def hub_download_options(settings: Settings) -> dict[str, Any]:
    """`snapshot_download` arguments for MODEL_ID: its revision, the volume's cache, only the files serving needs
    (and no weights at all with LOAD_FORMAT=dummy)."""
    patterns = CHECKPOINT_FILES
    if settings.load_format == "dummy":
        patterns = [pattern for pattern in CHECKPOINT_FILES if pattern != "*.safetensors"]
    return {
        "repo_id": settings.model_id,
        "revision": settings.model_revision,
        "cache_dir": settings.hub_cache_dir,
        "allow_patterns": patterns,
    }


def resolve_checkpoint(settings: Settings) -> tuple[Path, str | None]:
    """A local folder holding the checkpoint, and the commit it came from (None for a plain folder).

    A hub id already in the cache is used with no network at all; otherwise it is downloaded into
    `$HF_HOME/hub` (interrupted downloads resume).
    """
    local = Path(settings.model_id).expanduser()
    if local.is_dir():
        return local.resolve(), None
    if settings.model_id.startswith((".", "/", "~")):
        raise ModelLoadError(f"MODEL_ID={settings.model_id} looks like a folder, but no such folder exists.")
    options = hub_download_options(settings)
    try:
        folder = snapshot_download(**options, local_files_only=True)
    except LocalEntryNotFoundError:
        logger.info("%s is not in the cache %s: downloading it", settings.model_id, settings.hub_cache_dir or "")
        try:
            folder = snapshot_download(**options)
        except Exception as exc:  # network, auth, missing repo: all end the load with one clear reason
            raise ModelLoadError(
                f"Could not download {settings.model_id} (revision {settings.model_revision or 'main'}): {exc}. "
                "Check the id, HF_TOKEN for gated models, and the network; or point MODEL_ID at a local folder."
            ) from exc
    path = Path(folder)
    return path, path.name


def _read_chat_template(checkpoint: Path, tokenizer: Any) -> str:
    """The chat template: the tokenizer's own, else the processor's `chat_template.json` / `.jinja`."""
    if getattr(tokenizer, "chat_template", None):
        template = tokenizer.chat_template
        return template if isinstance(template, str) else template.get("default", next(iter(template.values())))
    jinja = checkpoint / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = checkpoint / "chat_template.json"
    if as_json.is_file():
        return json.loads(as_json.read_text(encoding="utf-8"))["chat_template"]
    raise ModelLoadError(f"{checkpoint} has no chat template (tokenizer_config.json or chat_template.json).")


def _eos_token_ids(tokenizer: Any, generation_config: GenerationConfig | None) -> frozenset[int]:
    """Every token that ends an answer: the generation config's, the tokenizer's, and `<|im_end|>`."""
    ids: set[int] = set()
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(token) for token in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return frozenset(ids)


def _authors_generation_config(checkpoint: str) -> GenerationConfig | None:
    """The checkpoint's own generation_config.json, or None. (A loaded model always has a generation config:
    without the file transformers makes one with `do_sample: false`, which is nobody's choice of greedy.)"""
    try:
        return GenerationConfig.from_pretrained(checkpoint)
    except OSError:
        return None


def _generation_defaults(generation_config: GenerationConfig | None) -> GenerationDefaults:
    """Sampling defaults the model's authors chose; a config with `do_sample: false` means greedy."""
    if generation_config is None:
        return GenerationDefaults()
    if not getattr(generation_config, "do_sample", False):
        return GenerationDefaults(temperature=0.0, repetition_penalty=generation_config.repetition_penalty)
    return GenerationDefaults(
        temperature=generation_config.temperature,
        top_p=generation_config.top_p,
        top_k=generation_config.top_k,
        repetition_penalty=generation_config.repetition_penalty,
    )


def _context_length(config: Any, settings: Settings) -> int:
    """The longest prompt + answer: MAX_MODEL_LEN if set, never more than the model's position range."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_limit = int(getattr(text_config, "max_position_embeddings", 32768))
    return min(settings.max_model_len, model_limit) if settings.max_model_len else model_limit


def is_image_text_to_text(config: Any) -> bool:
    """Whether the checkpoint reads images (Qwen2.5-VL) rather than text alone (Qwen2)."""
    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and hasattr(config, "vision_config")


def model_class_for(config: Any):
    """The transformers Auto class that builds this checkpoint: chosen by its config, never its name."""
    return AutoModelForImageTextToText if is_image_text_to_text(config) else AutoModelForCausalLM


def random_model(model_class, config: Any, dtype: torch.dtype, attn_implementation: str, device: str):
    """The architecture with random weights made directly on `device` in `dtype` (LOAD_FORMAT=dummy): a
    full-size model can be measured on a GPU without its 64 GB of weights, and no copy ever sits in CPU
    memory. Seeded, so two loads are the same model."""
    torch.manual_seed(0)
    with torch.device(device):
        return model_class.from_config(config, dtype=dtype, attn_implementation=attn_implementation)


def load_model(settings: Settings) -> LoadedModel:
    """Load the checkpoint named by MODEL_ID onto the configured devices; log time and memory."""
    started = time.perf_counter()
    checkpoint, revision = resolve_checkpoint(settings)
    try:
        config = AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{checkpoint} has no usable config.json: {exc}") from exc
    is_multimodal = is_image_text_to_text(config)

    hardware = Hardware.detect()
    on_gpu = uses_cuda(settings.device_map, hardware)
    dtype = resolve_dtype(settings.dtype, hardware if on_gpu else Hardware(0, False), _checkpoint_dtype(config))
    options: dict[str, Any] = {"dtype": dtype, "attn_implementation": settings.attn_implementation}
    if on_gpu:
        options["device_map"] = settings.device_map
        options["max_memory"] = max_memory_map(settings.max_gpu_memory, hardware)
    elif hardware.cuda_devices == 0 and settings.device_map not in ("auto", "cpu"):
        logger.warning("DEVICE_MAP=%s ignored: no CUDA device is visible, loading on CPU", settings.device_map)

    model_class = model_class_for(config)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    image_processor = AutoImageProcessor.from_pretrained(checkpoint) if is_multimodal else None
    chat_template = _read_chat_template(checkpoint, tokenizer)
    if settings.load_format == "dummy":
        model = random_model(model_class, config, dtype, settings.attn_implementation, "cuda:0" if on_gpu else "cpu")
    else:
        model = model_class.from_pretrained(checkpoint, **options)
    model.eval()

    generation_config = getattr(model, "generation_config", None)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        image_processor=image_processor,
        chat_template=chat_template,
        checkpoint_dir=checkpoint,
        resolved_revision=revision,
        dtype=dtype,
        device=model.get_input_embeddings().weight.device,
        device_map=getattr(model, "hf_device_map", None) or str(model.device),
        max_model_len=_context_length(config, settings),
        eos_token_ids=_eos_token_ids(tokenizer, generation_config),
        image_token_id=getattr(config, "image_token_id", None) if is_multimodal else None,
        generation_defaults=_generation_defaults(_authors_generation_config(checkpoint)),
        parameter_count=sum(parameter.numel() for parameter in model.parameters()),
        load_seconds=time.perf_counter() - started,
    )
    loaded.memory_after_load = memory_report()
    logger.info(
        "loaded %s (%s, %.1fM parameters, %s on %s) in %.1f s; memory: %s",
        settings.model_id,
        type(model).__name__,
        loaded.parameter_count / 1e6,
        str(dtype).removeprefix("torch."),
        loaded.device,
        loaded.load_seconds,
        _memory_summary(loaded.memory_after_load),
    )
    return loaded


def _checkpoint_dtype(config: Any) -> torch.dtype | None:
    """The dtype the checkpoint was saved in (`dtype`/`torch_dtype` in config.json), if it says."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _memory_summary(report: dict) -> str:
    """A short human-readable line for the load log."""
    parts = [f"process RSS {report['process_rss_bytes'] / 2**30:.2f} GiB"]
    for gpu in report["gpus"]:
        parts.append(
            f"cuda:{gpu['index']} {gpu['allocated_bytes'] / 2**30:.2f} GiB allocated, "
            f"{gpu['reserved_bytes'] / 2**30:.2f} GiB reserved of {gpu['total_bytes'] / 2**30:.1f} GiB"
        )
    return "; ".join(parts)
