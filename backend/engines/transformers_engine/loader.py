"""Load a Qwen2.5-VL (image-text-to-text) or Qwen2 (causal LM) checkpoint with everything serving needs.

The same function loads the 64 GB `FreedomIntelligence/ShizhenGPT-32B-VL` from the hub cache and the tiny
test checkpoint from a folder: the model class follows the checkpoint's config, never its name.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from backend.engines.checkpoint import (
    ModelLoadError,
    hub_download_options,
    read_checkpoint,
    read_config,
    resolve_checkpoint,
)
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

__all__ = ["LoadedModel", "ModelLoadError", "hub_download_options", "load_model", "model_class_for"]


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
    config = read_config(checkpoint)
    info = read_checkpoint(settings, checkpoint, revision, config)
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
    image_processor = AutoImageProcessor.from_pretrained(checkpoint) if is_multimodal else None
    if settings.load_format == "dummy":
        model = random_model(model_class, config, dtype, settings.attn_implementation, "cuda:0" if on_gpu else "cpu")
    else:
        model = model_class.from_pretrained(checkpoint, **options)
    model.eval()

    loaded = LoadedModel(
        model=model,
        tokenizer=info.tokenizer,
        image_processor=image_processor,
        chat_template=info.chat_template,
        checkpoint_dir=checkpoint,
        resolved_revision=revision,
        dtype=dtype,
        device=model.get_input_embeddings().weight.device,
        device_map=getattr(model, "hf_device_map", None) or str(model.device),
        max_model_len=info.max_model_len,
        eos_token_ids=info.eos_token_ids,
        image_token_id=info.image_token_id if is_multimodal else None,
        generation_defaults=info.generation_defaults,
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
