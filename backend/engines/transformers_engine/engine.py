"""The transformers engine: owns the model and the one inference thread, and hands out generation streams.

Where a request waits and where the model runs: `generate_many` puts `GenerationJob`s in the scheduler's
queue; the inference thread (one, so CUDA state stays on it) batches them with the running sequences
(`scheduler.py`, `batch.py`). A job emits events back to the event loop through an `EventRelay`; a
`GenerationStream` hands them to the HTTP handler. The event loop never waits on the model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future
from typing import Any

from anyio import to_thread

from backend.engines.client import EngineClient, EngineReport, ServedModel
from backend.engines.events import EventRelay, GenerationEvent, GenerationStream, TextDelta
from backend.engines.requests import ChatTurn, SamplingParams
from backend.engines.transformers_engine.devices import memory_report
from backend.engines.transformers_engine.generation import GenerationJob
from backend.engines.transformers_engine.loader import LoadedModel, load_model
from backend.engines.transformers_engine.prompt import ModelInputs, PromptBuilder
from backend.engines.transformers_engine.scheduler import Scheduler
from backend.errors import ModelNotReadyError
from backend.media.resize import PixelBounds
from backend.settings import Settings

logger = logging.getLogger(__name__)


class TransformersEngine(EngineClient):
    """Loads the model on the inference thread, then runs the scheduler there until shutdown."""

    name = "transformers"

    def __init__(self, settings: Settings, loader=load_model, reason: str = "ENGINE=transformers") -> None:
        super().__init__(settings.model_name)
        self.settings = settings
        self.reason = reason  # why this engine was chosen (ENGINE=auto explains itself)
        self._loader = loader
        self.loaded: LoadedModel | None = None
        self.scheduler: Scheduler | None = None
        self._prompt_builder: PromptBuilder | None = None
        self._thread: threading.Thread | None = None
        self._load_done: Future[None] = Future()
        self._relay: EventRelay | None = None
        self._shutting_down = False

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
        self._model = ServedModel(
            max_model_len=loaded.max_model_len,
            accepts_images=loaded.accepts_images,
            generation_defaults=loaded.generation_defaults,
            resolved_revision=loaded.resolved_revision,
        )
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

    async def prepare(self, turns: list[ChatTurn], bounds: PixelBounds | None = None) -> ModelInputs:
        """Template, tokenise and preprocess images in a worker thread (CPU work kept off the event loop)."""
        self.require_loaded()
        assert self._prompt_builder is not None
        bounds = bounds or PixelBounds(self.settings.min_pixels, self.settings.max_pixels)
        return await to_thread.run_sync(self._prompt_builder.build, turns, bounds)

    async def prepare_raw(self, prompt: str | list[int]) -> ModelInputs:
        """A legacy completion's prompt as the model's input ids (tokenised in a worker thread)."""
        self.require_loaded()
        assert self._prompt_builder is not None
        return await to_thread.run_sync(self._prompt_builder.build_raw, prompt)

    def decode(self, token_ids: list[int]) -> str:
        """Token ids as text, control tokens included."""
        assert self._prompt_builder is not None
        return self._prompt_builder.renderer.decode(token_ids)

    def generate_many(self, choices: list[tuple[str, SamplingParams]], prompt: ModelInputs) -> list[GenerationStream]:
        """Queue one generation per (request id, sampling) on the same prompt, all or none: a 429 leaves
        nothing queued, so no choice runs for a client that was refused."""
        self.require_loaded()
        assert self.scheduler is not None
        if self._relay is None:
            self._relay = EventRelay(asyncio.get_running_loop())
        jobs, streams = [], []
        for request_id, params in choices:
            queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
            job = GenerationJob(request_id, prompt, params, self._emitter(queue))
            job.deadline = job.submitted_at + self.settings.request_timeout_seconds
            jobs.append(job)
            streams.append(GenerationStream(queue, job.cancelled.set))
        self.scheduler.submit(*jobs)
        return streams

    def _emitter(self, queue: asyncio.Queue):
        """The `emit` of one job: final events go to the listeners (stats, metrics), every event to `queue`."""
        relay = self._relay
        assert relay is not None

        def emit(event: GenerationEvent) -> None:
            if not isinstance(event, TextDelta):
                self._notify(event)
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

    def queue_sizes(self) -> tuple[int, int]:
        """(running, waiting) generations now."""
        scheduler = self.scheduler
        return (scheduler.running, scheduler.waiting) if scheduler is not None else (0, 0)

    def memory(self) -> dict[str, Any]:
        """Process RSS and, on CUDA, each GPU's allocated, reserved, free and total bytes."""
        return memory_report()

    def report(self) -> EngineReport:
        """The inference thread's queue and timings, and where the model runs."""
        details: dict[str, Any] = {"engine_reason": self.reason}
        if (loaded := self.loaded) is not None:
            details |= {
                "dtype": str(loaded.dtype).removeprefix("torch."),
                "device": str(loaded.device),
                "device_map": loaded.device_map,
                "parameters": loaded.parameter_count,
                "load_seconds": round(loaded.load_seconds, 3),
            }
        queue: dict[str, int] = {}
        if (scheduler := self.scheduler) is not None:
            queue = {
                "running": scheduler.running,
                "waiting": scheduler.waiting,
                "peak_running": scheduler.peak_running,
                "peak_waiting": scheduler.peak_waiting,
                "max_batch_size": scheduler.max_batch_size,
                "max_queue": scheduler.max_queue,
                "prefill_passes": scheduler.prefill_passes,
                "prefill_ms": round(scheduler.prefill_seconds * 1000),
                "decode_steps": scheduler.decode_steps,
                "decode_ms": round(scheduler.decode_seconds * 1000),
            }
        return EngineReport(self.name, details, queue, self.stats, self.memory())

