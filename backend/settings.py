"""Server configuration: one pydantic-settings class read from the environment and `.env`.

Every setting is listed and explained in `.env.example`. Names are case-insensitive environment variables
(`MODEL_ID`, `MAX_GPU_MEMORY`, ...). A bad value stops start-up with a message naming the variable
(see `describe_settings_error`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL_ID = "FreedomIntelligence/ShizhenGPT-32B-VL"

# "75GiB", "80GB", "512MiB", "1.5TB": what accelerate's `max_memory` accepts.
_MEMORY_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", re.IGNORECASE)


class Settings(BaseSettings):
    """Everything the operator can set. Defaults suit ShizhenGPT-32B-VL on one A100 80 GB."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        validate_default=True,
    )

    # --- model ---
    model_id: str = Field(DEFAULT_MODEL_ID, min_length=1, description="Hugging Face repo id or local directory")
    model_revision: str | None = Field(None, description="branch, tag or commit of MODEL_ID; empty = main")
    served_model_name: str | None = Field(None, description="name clients use in `model`; empty = MODEL_ID")
    hf_home: Path | None = Field(None, description="Hugging Face cache root (RunPod: /workspace/models)")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    device_map: str = Field("auto", min_length=1, description="accelerate device map: auto, cuda:0, cpu, ...")
    max_gpu_memory: str = Field("75GiB", description="memory cap per GPU for the weights (accelerate max_memory)")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    max_model_len: int | None = Field(None, gt=0, description="context length; empty = the model's own")
    load_format: Literal["auto", "dummy"] = Field(
        "auto", description="dummy: random weights made on the device (measure an architecture without its weights)"
    )

    # --- engine ---
    engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="auto: vLLM when installed and it supports the checkpoint's architecture"
    )
    gpu_memory_utilization: float = Field(
        0.92, gt=0, le=1, description="vLLM: share of each GPU's memory for weights, activations and KV cache"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs one model is split across")
    enable_prefix_caching: bool = Field(True, description="vLLM: reuse the KV cache of a prompt's shared start")
    speculative_config: Annotated[dict[str, Any] | None, NoDecode] = Field(
        None, description='vLLM: speculative decoding as vLLM takes it, JSON ({"method": "ngram", ...})'
    )
    enforce_eager: bool = Field(
        False, description="vLLM: skip graph compilation and capture (starts much sooner, decodes slower)"
    )
    cpu_kv_cache_gib: float = Field(4.0, gt=0, description="vLLM on CPU: memory for the KV cache (GiB)")
    warmup: bool = Field(False, description="run one short generation after loading, before /ping says ready")

    # --- server ---
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=1, le=65535)
    port_health: int | None = Field(
        None, ge=1, le=65535, description="second port answering only /ping and /health (RunPod serverless)"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins of other sites' pages allowed to call the API; empty = none"
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Host names served besides loopback, IP addresses and the pod's proxy"
    )
    runpod_pod_id: str | None = Field(None, description="set by RunPod in every pod: its proxy names are served")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    api_key: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list, description="accepted bearer keys")
    shutdown_grace_seconds: float = Field(30.0, ge=0, description="how long running requests may finish on SIGTERM")
    body_read_timeout_seconds: float = Field(30.0, gt=0, description="the whole body must arrive within this (408)")
    header_read_timeout_seconds: float = Field(10.0, gt=0, description="a connection's request line and headers")
    max_connections: int = Field(1000, ge=1, description="open connections at once; more are answered 503")
    max_messages: int = Field(1024, ge=1, description="messages per chat request")
    max_request_bytes: int = Field(32 * 2**20, gt=0, description="largest request body (413 above)")
    stream_keepalive_seconds: float = Field(15.0, gt=0, le=90, description="SSE comment interval while waiting")

    # --- scheduling ---
    max_batch_size: int = Field(32, ge=1, description="sequences decoded together")
    max_batch_tokens: int = Field(24576, ge=1, description="budget of prompt + max_tokens over the running batch")
    max_queue: int = Field(64, ge=0, description="requests waiting beyond the batch; more get 429")
    request_timeout_seconds: float = Field(600.0, gt=0, description="queue + generation time before a 504")

    # --- generation ---
    default_max_tokens: int = Field(1024, gt=0)
    max_tokens_limit: int = Field(8192, gt=0)
    max_n: int = Field(4, ge=1, le=16, description="largest `n` (choices per request) accepted")
    system_prompt: str = Field("", description="system message added when a request has none; empty = template's")

    # --- images ---
    min_pixels: int = Field(56 * 56, gt=0, description="lower bound of an image's area after resizing")
    max_pixels: int = Field(360 * 420, gt=0, description="upper bound of an image's area after resizing")
    max_image_bytes: int = Field(20 * 2**20, gt=0, description="largest encoded image (413 above)")
    max_image_pixels: int = Field(
        25_000_000, gt=0, description="largest image area decoded, checked before decoding (JPEGs at reduced scale)"
    )
    max_request_image_pixels: int = Field(50_000_000, gt=0, description="decoded area of one request's images")
    max_concurrent_image_decodes: int = Field(2, ge=1, description="images decoded at once, server-wide")
    max_images_per_request: int = Field(8, ge=1)
    image_url_allowed_domains: Annotated[list[str], NoDecode] = Field(default_factory=list)
    image_url_allow_private_networks: bool = False
    image_url_timeout_seconds: float = Field(10.0, gt=0, le=120)

    # --- answers ---
    medical_disclaimer: str = Field(
        "提示：以上内容由AI生成，仅供参考，不能替代执业医师的诊断与治疗。(AI-generated; not a medical diagnosis.)",
        description="line appended to /v1/vision/analyze answers; empty = none",
    )

    @field_validator(
        "model_revision",
        "served_model_name",
        "hf_home",
        "max_model_len",
        "port_health",
        "runpod_pod_id",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value):
        """An empty variable (`MODEL_REVISION=`) means 'not set', as in `.env.example`."""
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("cors_origins", "allowed_hosts", "image_url_allowed_domains", "api_key", mode="before")
    @classmethod
    def _split_list(cls, value):
        """Lists are comma-separated (`CORS_ORIGINS=*`, `IMAGE_URL_ALLOWED_DOMAINS=a.com,b.org`)."""
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("speculative_config", mode="before")
    @classmethod
    def _parse_json_object(cls, value):
        """SPECULATIVE_CONFIG is JSON, as `vllm serve --speculative-config` takes it."""
        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f'must be a JSON object such as {{"method": "ngram", ...}}: {exc}') from exc
            if not isinstance(value, dict):
                raise ValueError('must be a JSON object such as {"method": "ngram", ...}')
        return value

    @field_validator("image_url_allowed_domains")
    @classmethod
    def _normalise_domains(cls, value: list[str]) -> list[str]:
        """Host names only, lower case: `https://Example.com/` is a mistake worth refusing."""
        for domain in value:
            if "/" in domain or ":" in domain or " " in domain:
                raise ValueError(f"{domain!r} is not a bare domain name such as images.example.com")
        return [domain.lower().lstrip(".").rstrip(".") for domain in value]

    @field_validator("max_gpu_memory")
    @classmethod
    def _check_memory_size(cls, value: str) -> str:
        """A size accelerate understands, e.g. `75GiB`."""
        value = value.strip()
        if not _MEMORY_SIZE.match(value):
            raise ValueError("must be a size such as 75GiB or 80GB")
        return value.replace(" ", "")

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        """Cross-field rules."""
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("DEFAULT_MAX_TOKENS must not exceed MAX_TOKENS_LIMIT")
        if self.min_pixels > self.max_pixels:
            raise ValueError("MIN_PIXELS must not exceed MAX_PIXELS")
        return self

    @property
    def api_keys(self) -> list[str]:
        """The configured keys in clear (for the auth middleware only; never log them)."""
        return [key.get_secret_value() for key in self.api_key]

    @property
    def model_name(self) -> str:
        """The name clients see in `/v1/models` and in responses."""
        return self.served_model_name or self.model_id

    @property
    def hub_cache_dir(self) -> Path | None:
        """Where Hugging Face hub downloads live: `$HF_HOME/hub`, as huggingface_hub lays it out."""
        return self.hf_home / "hub" if self.hf_home is not None else None


def describe_settings_error(error: ValidationError) -> str:
    """Turn a settings validation error into lines that name each bad environment variable."""
    lines = ["Invalid configuration:"]
    for item in error.errors():
        name = "_".join(str(part) for part in item["loc"]).upper() or "settings"
        given = item.get("input")
        shown = f" (got {given!r})" if isinstance(given, str | int | float) else ""
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {name}: {message}{shown}")
    lines.append("Fix the variable in the environment or in .env (every setting is explained in .env.example).")
    return "\n".join(lines)
