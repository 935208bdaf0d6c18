"""`EngineClient`: the one interface the HTTP side uses, whichever engine runs under it.

The handlers, `/health`, `/v1/models`, `/metrics` and the app factory depend on this class alone (as vLLM's
serving layer depends on its `EngineClient`), so a test can hand them a tiny model or a fake engine. An engine
loads its model in the background after `start`, says how far it got (`state`, `unavailable()`), prepares
prompts (their token counts known before anything is generated) and generates streams of events.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from backend.engines.events import EngineStats, GenerationEvent, GenerationStream
from backend.engines.requests import ChatTurn, GenerationDefaults, PreparedPrompt, SamplingParams
from backend.errors import ModelNotReadyError
from backend.media.resize import PixelBounds

logger = logging.getLogger(__name__)

EngineState = Literal["loading", "ready", "error"]
WARMUP_TOKENS = 8
WARMUP_IMAGE_SIZE = (360, 420)  # the default MAX_PIXELS: the largest image a default request sends


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

    def __init__(self, served_name: str = "model") -> None:
        self.served_name = served_name  # the model's name in messages ("... is still loading")
        self._model: ServedModel | None = None  # set by the engine once its model is loaded
        self.error_code = "model_load_failed"  # or "engine_dead" once a loaded engine has stopped for good
        self._state: EngineState = "loading"
        self.warming = False  # WARMUP: loaded, running its first generation; announced as `loading` meanwhile
        self.error: str | None = None  # why the state is `error`
        self.stats = EngineStats()
        self._listeners: list = [self.stats.record]
        self.started_at = time.time()

    @property
    def state(self) -> EngineState:
        """`loading` (the model, or its warm-up generation), `ready`, or `error` (see `error`)."""
        return "loading" if self._state == "ready" and self.warming else self._state

    @state.setter
    def state(self, value: EngineState) -> None:
        self._state = value

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
    def model(self) -> ServedModel | None:
        """The loaded model's facts, once loaded."""
        return self._model

    def require_ready(self) -> ServedModel:
        """The loaded (and warmed-up) model, or the 503 that says why there is none."""
        model = self.model
        if self.state == "ready" and model is not None:
            return model
        raise self.unavailable()

    def require_loaded(self) -> ServedModel:
        """The loaded model, warmed up or not (what an engine itself checks before it takes work)."""
        model = self.model
        if self._state == "ready" and model is not None:
            return model
        raise self.unavailable()

    def start_warm_up(self) -> asyncio.Task:
        """WARMUP: once loaded, run one short generation (with an image when the model reads images) before
        `/ping` and `/health` say ready, so the first user does not pay for compilation and allocation."""
        self.warming = True
        return asyncio.create_task(self._warm_up(), name="warm-up")

    async def _warm_up(self) -> None:
        try:
            await self.wait_until_loaded()
            if self._state != "ready":
                return
            started = time.perf_counter()
            model = self.require_loaded()
            parts: list = ["你好，请介绍一下你自己。"]
            if model.accepts_images:
                parts.append(Image.new("RGB", WARMUP_IMAGE_SIZE, (200, 120, 110)))
            prompt = await self.prepare([ChatTurn("user", parts, image_sources=["warm-up image"])])
            params = SamplingParams(max_new_tokens=WARMUP_TOKENS, temperature=0.0, ignore_eos=True)
            await self.generate("warm-up", prompt, params).collect()
            logger.info("warm-up generation done in %.1f s; ready", time.perf_counter() - started)
        except Exception:  # a failed warm-up costs the first user some time, not the server its life
            logger.exception("the warm-up generation failed; serving without it")
        finally:
            self.warming = False

    def unavailable(self) -> ModelNotReadyError:
        """The 503 for a request while the engine is not ready: loading, failed to load, or stopped."""
        if self.state == "loading":
            return ModelNotReadyError(
                f"The model {self.served_name} is still loading; retry in a moment.", code="model_loading"
            )
        if self.error_code == "engine_dead":
            return ModelNotReadyError(self.error or "The engine stopped; restart the server.", code=self.error_code)
        return ModelNotReadyError(f"The model failed to load: {self.error}", code="model_load_failed")

    # --- requests ---

    @abc.abstractmethod
    async def prepare(self, turns: list[ChatTurn], bounds: PixelBounds | None = None) -> PreparedPrompt:
        """Template, tokenise and preprocess images off the event loop; token counts are known after this.
        `bounds` are the images' pixel bounds (default: the server's MIN_PIXELS / MAX_PIXELS)."""

    @abc.abstractmethod
    async def prepare_raw(self, prompt: str | list[int]) -> PreparedPrompt:
        """A legacy completion's prompt (text with the control tokens it spells out, or token ids), text only."""

    @abc.abstractmethod
    def decode(self, token_ids: list[int]) -> str:
        """Token ids as text, control tokens included (to echo a prompt given as ids)."""

    @abc.abstractmethod
    def generate_many(
        self, choices: list[tuple[str, SamplingParams]], prompt: PreparedPrompt
    ) -> list[GenerationStream]:
        """Queue one generation per (request id, sampling) on the same prompt, all or none: a 429
        (QueueFullError) or a 503 leaves nothing queued. Every engine keeps the same promises for each
        generation: it ends with one `Finished` or `Failed`; `cancel()` aborts it in the engine (`abort`);
        past REQUEST_TIMEOUT_SECONDS from now it is stopped and fails with RequestTimeoutError (504)."""

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
        """`{"process_rss_bytes": int, "gpus": [{index, used_bytes, total_bytes, ...}], ...}`: every engine
        reports each GPU's used and total bytes; one whose model lives in this process adds its allocator's
        `allocated_bytes` and `reserved_bytes`, one with engine processes their `engine_core_rss_bytes`."""
