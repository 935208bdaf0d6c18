"""The model side, behind one interface.

- `client.py`: `EngineClient`, the interface the HTTP side (handlers, /health, /metrics, the app factory)
  depends on, and nothing below it.
- `events.py`, `requests.py`: what goes in and out of an engine, in engine-neutral terms (no torch).
- `checkpoint.py`, `chat_prompt.py`: what every engine reads from a checkpoint, and how every engine turns a
  conversation into token ids (so both count and template alike).
- `transformers_engine/`: the engine that runs anywhere transformers runs (its own continuous batching).
- `vllm_engine/`: vLLM's `AsyncLLM`, for speed and tensor parallelism (`ENGINE=vllm`).
- `fake.py`: an engine without a model, for tests of handler logic.

`create_engine(settings)` builds the configured engine; nothing else knows which one runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from backend.engines.client import EngineClient
from backend.settings import Settings

logger = logging.getLogger(__name__)


def choose_engine(settings: Settings) -> tuple[str, str]:
    """(engine name, why): ENGINE as set, or for `auto` vLLM when it is installed and supports the
    checkpoint's architecture, else transformers."""
    if settings.engine != "auto":
        return settings.engine, f"ENGINE={settings.engine}"
    from backend.engines.vllm_engine.options import unsupported_reason, vllm_installed

    if not vllm_installed():
        return "transformers", "ENGINE=auto: vLLM is not installed in this environment"
    architecture = _architecture(settings)
    if architecture is None:  # vLLM was installed on purpose; its own load will say if it cannot serve this
        return "vllm", "ENGINE=auto: vLLM is installed (the checkpoint's architecture could not be read first)"
    reason = unsupported_reason(architecture)
    if reason is not None:
        return "transformers", f"ENGINE=auto: {reason}"
    return "vllm", f"ENGINE=auto: vLLM is installed and implements {architecture}"


def _architecture(settings: Settings) -> str | None:
    """The checkpoint's architecture, from a local folder, the hub cache, or the hub's config.json."""
    try:
        from backend.engines.checkpoint import read_config, resolve_local_checkpoint

        folder = resolve_local_checkpoint(settings)
        if folder is None:  # a fresh volume: the config alone is fetched now (the engine fetches the rest)
            from huggingface_hub import hf_hub_download

            options = {"revision": settings.model_revision, "cache_dir": settings.hub_cache_dir}
            folder = Path(hf_hub_download(settings.model_id, "config.json", **options)).parent
        config = read_config(folder)
    except Exception:  # the engine's own load will report the problem properly
        return None
    return (getattr(config, "architectures", None) or [config.model_type])[0]


def create_engine(settings: Settings) -> EngineClient:
    """The engine that serves MODEL_ID (imported here, so that the HTTP side never imports torch)."""
    name, reason = choose_engine(settings)
    logger.info("engine: %s (%s)", name, reason)
    if name == "vllm":
        from backend.engines.vllm_engine.engine import VllmEngine

        return VllmEngine(settings, reason)
    from backend.engines.transformers_engine.engine import TransformersEngine

    return TransformersEngine(settings, reason=reason)
