"""What every engine reads from a checkpoint before it loads weights: where the folder is, the tokenizer and
chat template, the tokens that end an answer, the authors' sampling defaults and the context length.

Both engines use this module, so a prompt is tokenised, counted and ended the same way whichever engine runs.
Nothing here imports torch: it runs in the vLLM environment (transformers 5.19) as in ours (5.23).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from backend.engines.requests import GenerationDefaults
from backend.errors import ModelLoadError
from backend.settings import Settings

logger = logging.getLogger(__name__)

# What serving needs from a hub repository; other formats (.bin, .pth, original/) are never fetched.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
IMAGE_PLACEHOLDER = "<|image_pad|>"  # the token Qwen2.5-VL's template writes once per image


@dataclass
class CheckpointInfo:
    """A checkpoint's folder and the facts serving needs from it, read without loading any weight."""

    folder: Path
    resolved_revision: str | None  # the commit a hub download came from; None for a plain folder
    config: Any
    tokenizer: Any
    chat_template: str
    eos_token_ids: frozenset[int]
    generation_defaults: GenerationDefaults
    max_model_len: int
    image_token_id: int | None  # None: the model reads text only

    @property
    def accepts_images(self) -> bool:
        """Qwen2.5-VL checkpoints take images; text-only Qwen2 ones do not."""
        return self.image_token_id is not None

    @property
    def architecture(self) -> str:
        """The model class the checkpoint names (`Qwen2_5_VLForConditionalGeneration`, ...)."""
        return (getattr(self.config, "architectures", None) or [self.config.model_type])[0]


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


def resolve_local_checkpoint(settings: Settings) -> Path | None:
    """The checkpoint's folder if it is here already (a folder, or the hub cache), without any download."""
    local = Path(settings.model_id).expanduser()
    if local.is_dir():
        return local.resolve()
    try:
        return Path(snapshot_download(**hub_download_options(settings), local_files_only=True))
    except Exception:  # not cached (or not a hub id): only a download would tell
        return None


def read_config(folder: Path) -> Any:
    """The checkpoint's transformers config; a clear ModelLoadError when there is none."""
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{folder} has no usable config.json: {exc}") from exc


def read_checkpoint(settings: Settings, folder: Path, revision: str | None, config: Any) -> CheckpointInfo:
    """Tokenizer, template, end tokens, defaults and context length of an already resolved checkpoint."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    generation_config = _authors_generation_config(folder)
    reads_images = hasattr(config, "vision_config") and getattr(config, "image_token_id", None) is not None
    return CheckpointInfo(
        folder=folder,
        resolved_revision=revision,
        config=config,
        tokenizer=tokenizer,
        chat_template=read_chat_template(folder, tokenizer),
        eos_token_ids=eos_token_ids(tokenizer, generation_config, config),
        generation_defaults=generation_defaults(generation_config),
        max_model_len=context_length(config, settings),
        image_token_id=int(config.image_token_id) if reads_images else None,
    )


def read_chat_template(checkpoint: Path, tokenizer: Any) -> str:
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


def eos_token_ids(tokenizer: Any, generation_config: GenerationConfig | None, config: Any = None) -> frozenset[int]:
    """Every token that ends an answer: the generation config's (else the model config's), the tokenizer's,
    and `<|im_end|>`."""
    ids: set[int] = set()
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    configured = getattr(generation_config, "eos_token_id", None) or getattr(text_config, "eos_token_id", None)
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


def _authors_generation_config(checkpoint: Path) -> GenerationConfig | None:
    """The checkpoint's own generation_config.json, or None. (A loaded model always has a generation config:
    without the file transformers makes one with `do_sample: false`, which is nobody's choice of greedy.)"""
    try:
        return GenerationConfig.from_pretrained(checkpoint)
    except OSError:
        return None


def generation_defaults(generation_config: GenerationConfig | None) -> GenerationDefaults:
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


def context_length(config: Any, settings: Settings) -> int:
    """The longest prompt + answer: MAX_MODEL_LEN if set, never more than the model's position range."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_limit = int(getattr(text_config, "max_position_embeddings", 32768))
    return min(settings.max_model_len, model_limit) if settings.max_model_len else model_limit
