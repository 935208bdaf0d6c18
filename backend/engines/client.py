"""`EngineClient`: the one interface the HTTP side uses, whichever engine runs under it.

The handlers, `/health`, `/v1/models`, `/metrics` and the app factory depend on this class alone (as vLLM's
serving layer depends on its `EngineClient`), so a test can hand them a tiny model or a fake engine. An engine
loads its model in the background after `start`, says how far it got (`state`, `unavailable()`), prepares
prompts (their token counts known before anything is generated) and generates streams of events.
"""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from backend.engines.events import EngineStats, GenerationEvent, GenerationStream
from backend.engines.requests import ChatTurn, GenerationDefaults, PreparedPrompt, SamplingParams
from backend.errors import ModelNotReadyError
from backend.media.resize import PixelBounds

logger = logging.getLogger(__name__)

EngineState = Literal["loading", "ready", "error"]


@dataclass(frozen=True)
class ServedModel:
    """What the API tells about the loaded model, and what requests are checked against."""

    max_model_len: int
    accepts_images: bool
    generation_defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    resolved_revision: str | None = None  # the commit actually loaded


@dataclass
class EngineReport:
    """The engine's part of `/health`: how it runs and how busy it is."""

    engine: str  # "transformers", "vllm", ...
    details: dict[str, Any]  # dtype, device, parameters, load time, KV cache ... (engine-specific facts)
    queue: dict[str, int]  # running, waiting, peaks, limits, pass counts ...
    generation: EngineStats
    memory: dict[str, Any]  # process RSS and per-GPU bytes


class EngineClient(abc.ABC):
    """A model behind a queue: load in the background, prepare prompts, generate streams, stop."""

    name: str = "engine"  # shown in /health

    def __init__(self) -> None:
        self.state: EngineState = "loading"
        self.error: str | None = None  # why the state is `error`
        self.stats = EngineStats()
        self._listeners: list = [self.stats.record]
        self.started_at = time.time()

    # --- life cycle ---

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin loading the model in the background and return at once (`state` says `loading`)."""

    @abc.abstractmethod
    async def wait_until_loaded(self) -> None:
        """Return when the load has ended, successfully or not."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop every queued or running generation (each ends with `abort`), then the engine."""

    # --- the model ---

    @property
    @abc.abstractmethod
    def model(self) -> ServedModel | None:
        """The loaded model's facts, once loaded."""

    def require_ready(self) -> ServedModel:
        """The loaded model, or the 503 that says why there is none."""
        model = self.model
        if self.state == "ready" and model is not None:
            return model
        raise self.unavailable()

    @abc.abstractmethod
    def unavailable(self) -> ModelNotReadyError:
        """The 503 for a request while the engine is not ready: loading, failed to load, or stopped."""

    # --- requests ---

    @abc.abstractmethod
    async def prepare(self, turns: list[ChatTurn], bounds: PixelBounds | None = None) -> PreparedPrompt:
        """Template, tokenise and preprocess images off the event loop; token counts are known after this.
        `bounds` are the images' pixel bounds (default: the server's MIN_PIXELS / MAX_PIXELS)."""

    @abc.abstractmethod
    def generate_many(
        self, choices: list[tuple[str, SamplingParams]], prompt: PreparedPrompt
    ) -> list[GenerationStream]:
        """Queue one generation per (request id, sampling) on the same prompt, all or none: a 429
        (QueueFullError) or a 503 leaves nothing queued."""

    def generate(self, request_id: str, prompt: PreparedPrompt, params: SamplingParams) -> GenerationStream:
        """Queue one generation."""
        [stream] = self.generate_many([(request_id, params)], prompt)
        return stream

    # --- observation ---

    def add_listener(self, listener) -> None:
        """Call `listener(event)` with every final event (`Finished` / `Failed`), from any thread."""
        self._listeners.append(listener)

    def _notify(self, event: GenerationEvent) -> None:
        """Give a final event to the listeners; a failing statistic never costs a request its answer."""
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # logged; the event still reaches its client
                logger.exception("a generation listener failed")

    @abc.abstractmethod
    def queue_sizes(self) -> tuple[int, int]:
        """(running, waiting) generations now."""

    @abc.abstractmethod
    def report(self) -> EngineReport:
        """Everything `/health` shows about the engine."""

    @abc.abstractmethod
    def memory(self) -> dict[str, Any]:
        """`{"process_rss_bytes": int, "gpus": [{index, allocated_bytes, reserved_bytes, total_bytes, ...}]}`."""
