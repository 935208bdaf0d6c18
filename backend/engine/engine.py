"""The engine: owns the model and the one inference thread, and hands out generation streams.

Where a request waits and where the model runs: `Engine.generate` puts a `GenerationJob` on the inference
thread's queue (a single-worker executor, so jobs run one after another in arrival order, and CUDA state stays
on one thread). The job emits events back to the event loop with `call_soon_threadsafe`; a
`GenerationStream` hands them to the HTTP handler. The event loop never waits on the model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from anyio import to_thread

from backend.engine.generation import Failed, Finished, GenerationEvent, GenerationJob, TextDelta, run_generation
from backend.engine.loader import LoadedModel, load_model
from backend.engine.prompt import ChatTurn, ModelInputs, PromptBuilder
from backend.media.resize import PixelBounds
from backend.engine.sampling import SamplingParams
from backend.errors import ModelNotReadyError
from backend.settings import Settings

logger = logging.getLogger(__name__)

EngineState = Literal["loading", "ready", "error"]


@dataclass(frozen=True)
class GenerationResult:
    """A whole answer, for non-streaming responses."""

    text: str
    finish: Finished


class KeepAlive:
    """Yielded by `GenerationStream.events` when nothing happened for a keep-alive interval."""


KEEPALIVE = KeepAlive()


class GenerationStream:
    """The events of one generation, read on the event loop; `cancel()` stops it at the next step."""

    def __init__(self, job: GenerationJob, queue: asyncio.Queue[GenerationEvent]) -> None:
        self._job = job
        self._queue = queue
        self.finished: Finished | None = None

    @property
    def request_id(self) -> str:
        """The id of the request this stream answers."""
        return self._job.request_id

    def cancel(self) -> None:
        """Ask the inference thread to stop this generation (before it starts, or at the next token)."""
        self._job.cancelled.set()

    async def events(self, keepalive_seconds: float | None = None) -> AsyncIterator[TextDelta | KeepAlive]:
        """Yield text deltas until the end (then `finished` is set); a failure is raised here.

        With `keepalive_seconds`, KEEPALIVE is yielded whenever that long passes without an event (the
        request waits in the queue, or a long prefill runs). Leaving the loop early cancels the generation.
        """
        try:
            while self.finished is None:
                try:
                    # Cancelling a Queue.get loses no item, so waiting with a timeout is safe.
                    event = await asyncio.wait_for(self._queue.get(), keepalive_seconds)
                except TimeoutError:
                    yield KEEPALIVE
                    continue
                if isinstance(event, Failed):
                    raise event.error
                if isinstance(event, Finished):
                    self.finished = event
                else:
                    yield event
        finally:
            if self.finished is None:
                self.cancel()

    async def collect(self) -> GenerationResult:
        """Wait for the whole answer."""
        pieces = [event.text async for event in self.events() if isinstance(event, TextDelta)]
        assert self.finished is not None
        return GenerationResult("".join(pieces), self.finished)


@dataclass
class EngineStats:
    """Counters of finished generations, by finish reason (the proof that aborted ones really stopped)."""

    finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})
    failed: int = 0
    generated_tokens: int = 0
    last_aborted_tokens: int | None = None  # tokens the most recently aborted generation had produced

    def record(self, event: GenerationEvent) -> None:
        """Count a final event (called on the inference thread; readers only read)."""
        if isinstance(event, Failed):
            self.failed += 1
        elif isinstance(event, Finished):
            self.finished[event.finish_reason] = self.finished.get(event.finish_reason, 0) + 1
            self.generated_tokens += event.completion_tokens
            if event.finish_reason == "abort":
                self.last_aborted_tokens = event.completion_tokens


class Engine:
    """Loads the model on the inference thread and runs generations there, one at a time."""

    def __init__(self, settings: Settings, loader=load_model) -> None:
        self.settings = settings
        self._loader = loader
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.state: EngineState = "loading"
        self.error: str | None = None
        self.loaded: LoadedModel | None = None
        self._prompt_builder: PromptBuilder | None = None
        self._load_task: asyncio.Future | None = None
        self._pending: set[GenerationJob] = set()  # queued or running, so shutdown can stop them
        self.stats = EngineStats()
        self.started_at = time.time()

    async def start(self) -> None:
        """Begin loading the model in the background; `/health` says `loading` until it is done."""
        loop = asyncio.get_running_loop()
        self._load_task = loop.run_in_executor(self._executor, self._load)

    async def wait_until_loaded(self) -> None:
        """Wait for the load to end, successfully or not."""
        if self._load_task is not None:
            await asyncio.shield(self._load_task)

    def _load(self) -> None:
        try:
            loaded = self._loader(self.settings)
        except Exception as exc:  # reported by /health and the log; the server stays up to say so
            logger.exception("loading %s failed", self.settings.model_id)
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = "error"
            return
        self._prompt_builder = PromptBuilder(
            loaded.tokenizer,
            loaded.chat_template,
            loaded.image_processor,
            loaded.image_token_id,
            system_prompt=self.settings.system_prompt,
        )
        self.loaded = loaded
        self.state = "ready"

    def require_ready(self) -> LoadedModel:
        """The loaded model, or a 503 that says why there is none."""
        if self.state == "ready" and self.loaded is not None:
            return self.loaded
        if self.state == "loading":
            raise ModelNotReadyError(
                f"The model {self.settings.model_name} is still loading; retry in a moment.", code="model_loading"
            )
        raise ModelNotReadyError(f"The model failed to load: {self.error}", code="model_load_failed")

    async def build_inputs(self, turns: list[ChatTurn], bounds: PixelBounds | None = None) -> ModelInputs:
        """Template, tokenise and preprocess images in a worker thread (CPU work kept off the event loop)."""
        self.require_ready()
        assert self._prompt_builder is not None
        bounds = bounds or PixelBounds(self.settings.min_pixels, self.settings.max_pixels)
        return await to_thread.run_sync(self._prompt_builder.build, turns, bounds)

    def generate(self, request_id: str, inputs: ModelInputs, params: SamplingParams) -> GenerationStream:
        """Queue one generation on the inference thread; its events arrive on the returned stream."""
        loaded = self.require_ready()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()

        def emit(event: GenerationEvent) -> None:
            if not isinstance(event, TextDelta):
                self.stats.record(event)
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is closed: the server is shutting down
                pass

        job = GenerationJob(request_id, inputs, params, emit)
        self._pending.add(job)
        future = self._executor.submit(run_generation, loaded, job)
        future.add_done_callback(lambda _: self._pending.discard(job))
        return GenerationStream(job, queue)

    async def shutdown(self) -> None:
        """Stop every queued or running generation at its next step (each ends with `abort`), then the thread."""
        for job in list(self._pending):
            job.cancelled.set()
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: self._executor.shutdown(wait=True)
        )
