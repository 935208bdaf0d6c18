"""The engine: owns the model and the one inference thread, and hands out generation streams.

Where a request waits and where the model runs: `Engine.generate` puts a `GenerationJob` in the scheduler's
queue; the inference thread (one, so CUDA state stays on it) batches it with the running sequences
(`scheduler.py`, `batch.py`). The job emits events back to the event loop with `call_soon_threadsafe`; a
`GenerationStream` hands them to the HTTP handler. The event loop never waits on the model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

from anyio import to_thread

from backend.engine.generation import Failed, Finished, GenerationEvent, GenerationJob, TextDelta
from backend.engine.loader import LoadedModel, load_model
from backend.engine.prompt import ChatTurn, ModelInputs, PromptBuilder
from backend.engine.sampling import SamplingParams
from backend.engine.scheduler import Scheduler
from backend.errors import ModelNotReadyError
from backend.media.resize import PixelBounds
from backend.settings import Settings

logger = logging.getLogger(__name__)

EngineState = Literal["loading", "ready", "error"]


@dataclass(frozen=True)
class GenerationResult:
    """A whole answer, for non-streaming responses."""

    text: str
    finish: Finished


class EventRelay:
    """Carries events from the inference thread to the event loop, many per wake-up.

    A decode step of a 32-sequence batch makes 32 events; waking the loop once per event would make the
    loop compete with the model for the CPU. Events wait in a list until the one scheduled flush runs.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, GenerationEvent]] = []
        self._scheduled = False

    def put(self, queue: asyncio.Queue, event: GenerationEvent) -> None:
        """Called on the inference thread."""
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for queue, event in pending:
            queue.put_nowait(event)


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
    def drained(self) -> bool:
        """No event is waiting to be read right now (a good moment to flush what was read)."""
        return self._queue.empty()

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
    """Loads the model on the inference thread, then runs the scheduler there until shutdown."""

    def __init__(self, settings: Settings, loader=load_model) -> None:
        self.settings = settings
        self._loader = loader
        self.state: EngineState = "loading"
        self.error: str | None = None
        self.error_code = "model_load_failed"  # or "engine_dead" once a loaded engine's thread has stopped
        self.loaded: LoadedModel | None = None
        self.scheduler: Scheduler | None = None
        self._prompt_builder: PromptBuilder | None = None
        self._thread: threading.Thread | None = None
        self._load_done: Future[None] = Future()
        self._relay: EventRelay | None = None
        self._shutting_down = False
        self.stats = EngineStats()
        # Called with every final event (Finished / Failed) on the inference thread: stats, metrics.
        self.listeners: list = [self.stats.record]
        self.started_at = time.time()

    async def start(self) -> None:
        """Start the inference thread; it loads the model (`/health` says `loading` meanwhile), then serves."""
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    async def wait_until_loaded(self) -> None:
        """Wait for the load to end, successfully or not."""
        await asyncio.shield(asyncio.wrap_future(self._load_done))

    def _run(self) -> None:
        try:
            loaded = self._loader(self.settings)
        except Exception as exc:  # reported by /health and the log; the server stays up to say so
            logger.exception("loading %s failed", self.settings.model_id)
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = "error"
            self._load_done.set_result(None)
            return
        self._prompt_builder = PromptBuilder(
            loaded.tokenizer,
            loaded.chat_template,
            loaded.image_processor,
            loaded.image_token_id,
            system_prompt=self.settings.system_prompt,
            max_prompt_tokens=loaded.max_model_len,
        )
        self.scheduler = Scheduler(
            loaded,
            max_batch_size=self.settings.max_batch_size,
            max_batch_tokens=self.settings.max_batch_tokens,
            max_queue=self.settings.max_queue,
        )
        self.loaded = loaded
        self.state = "ready"
        self._load_done.set_result(None)
        if self._shutting_down:  # shutdown began while the model loaded: nothing is left to serve
            return
        try:
            self.scheduler.run()
        except BaseException as exc:  # the scheduler guards each step; this is the last line of defence
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        """The inference thread is ending for good: say so in /health and answer everyone at once (503)."""
        logger.critical("the inference thread stopped", exc_info=exc)
        self.error = f"The inference thread stopped ({type(exc).__name__}: {exc}); restart the server."
        self.error_code = "engine_dead"
        self.state = "error"
        assert self.scheduler is not None
        self.scheduler.fail_everything(ModelNotReadyError(self.error, code=self.error_code))

    def require_ready(self) -> LoadedModel:
        """The loaded model, or a 503 that says why there is none."""
        if self.state == "ready" and self.loaded is not None:
            return self.loaded
        raise self.unavailable()

    def unavailable(self) -> ModelNotReadyError:
        """The 503 for a request while the engine is not ready: loading, failed to load, or stopped."""
        if self.state == "loading":
            return ModelNotReadyError(
                f"The model {self.settings.model_name} is still loading; retry in a moment.", code="model_loading"
            )
        if self.error_code == "engine_dead":
            return ModelNotReadyError(self.error or "The inference thread stopped.", code=self.error_code)
        return ModelNotReadyError(f"The model failed to load: {self.error}", code="model_load_failed")

    async def build_inputs(self, turns: list[ChatTurn], bounds: PixelBounds | None = None) -> ModelInputs:
        """Template, tokenise and preprocess images in a worker thread (CPU work kept off the event loop)."""
        self.require_ready()
        assert self._prompt_builder is not None
        bounds = bounds or PixelBounds(self.settings.min_pixels, self.settings.max_pixels)
        return await to_thread.run_sync(self._prompt_builder.build, turns, bounds)

    def generate(self, request_id: str, inputs: ModelInputs, params: SamplingParams) -> GenerationStream:
        """Queue one generation for the scheduler; its events arrive on the returned stream.

        Raises QueueFullError (429) when MAX_QUEUE requests already wait.
        """
        [stream] = self.generate_many([(request_id, params)], inputs)
        return stream

    def generate_many(self, choices: list[tuple[str, SamplingParams]], inputs: ModelInputs) -> list[GenerationStream]:
        """Queue one generation per (request id, sampling) on the same prompt, all or none: a 429 leaves
        nothing queued, so no choice runs for a client that was refused."""
        self.require_ready()
        assert self.scheduler is not None
        if self._relay is None:
            self._relay = EventRelay(asyncio.get_running_loop())
        jobs, streams = [], []
        for request_id, params in choices:
            queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
            job = GenerationJob(request_id, inputs, params, self._emitter(queue))
            job.deadline = job.submitted_at + self.settings.request_timeout_seconds
            jobs.append(job)
            streams.append(GenerationStream(job, queue))
        self.scheduler.submit(*jobs)
        return streams

    def _emitter(self, queue: asyncio.Queue):
        """The `emit` of one job: final events go to the listeners (stats, metrics), every event to `queue`."""
        relay = self._relay
        assert relay is not None

        def emit(event: GenerationEvent) -> None:
            if not isinstance(event, TextDelta):
                for listener in self.listeners:
                    try:
                        listener(event)
                    except Exception:  # a statistic must never cost a request its answer, or the thread
                        logger.exception("a generation listener failed")
            relay.put(queue, event)

        return emit

    async def shutdown(self) -> None:
        """Stop every queued or running generation at its next step (each ends with `abort`), then the thread.

        During a load, the load is let finish (it cannot be interrupted) and the thread then ends."""
        self._shutting_down = True
        if self.scheduler is not None:
            self.scheduler.stop()
        if self._thread is not None:
            await to_thread.run_sync(self._thread.join)
