"""Model of `GET /health`: readiness and what is loaded where."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class HealthResponse(BaseModel):
    """Readiness and details; served with 200 when ready and 503 while loading or after a failed load.
    Each engine adds the facts of its own (dtype, device, KV cache, ...) beside the common fields."""

    model_config = ConfigDict(extra="allow")

    status: Literal["loading", "ready", "error"]
    error: str | None = None
    engine: str | None = None  # which engine serves: transformers, vllm
    engine_reason: str | None = None  # why: ENGINE as set, or what ENGINE=auto found
    model_id: str
    revision: str | None = None
    resolved_revision: str | None = None
    served_model_name: str
    accepts_images: bool | None = None
    dtype: str | None = None
    device: str | None = None
    device_map: dict[str, Any] | str | None = None
    parameters: int | None = None
    max_model_len: int | None = None
    memory: dict[str, Any]
    load_seconds: float | None = None
    kv_cache: dict[str, Any] | None = None  # vLLM: blocks, block size, capacity in tokens, usage, prefix hits
    uptime_seconds: float
    generation: dict[str, Any] | None = None  # counters: finished by reason, failed, generated tokens
    scheduler: dict[str, int] | None = None  # running, waiting, peaks, limits, and the engine's own counters
