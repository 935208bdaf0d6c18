"""`VllmEngine`: vLLM's `AsyncLLM` behind `EngineClient`.

What stays ours: the chat template and tokenisation (`ChatPromptRenderer`, the same code the transformers
engine uses), image intake and resizing, so token counts are known before generation and equal on both
engines. vLLM receives token ids with one `<|image_pad|>` per image and the resized images; it widens the
placeholders, schedules, pages the KV cache and runs the kernels. Its engine core runs in a child process
(that is how vLLM is built), started by spawning: `python -m backend` is safe to import.

What vLLM does not promise and we do: a bounded queue (vLLM queues without limit; MAX_QUEUE gives 429),
REQUEST_TIMEOUT (504, the request aborted in vLLM), every abort counted, and a dead engine core turned into
503 `engine_dead` and an `error` state in `/health`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field, fields
from typing import Any

from anyio import to_thread

from backend.engines.chat_prompt import ChatPromptRenderer, TokenPrompt
from backend.engines.checkpoint import CheckpointInfo, read_checkpoint, read_config, resolve_checkpoint
from backend.engines.client import EngineClient, EngineReport, ServedModel
from backend.engines.events import Failed, Finished, GenerationEvent, GenerationStream, TextDelta
from backend.engines.requests import ChatTurn, SamplingParams
from backend.engines.vllm_engine.observe import StepStats, child_pids, memory_report, stat_logger_factory
from backend.engines.vllm_engine.options import ended_by_end_token, engine_arguments, sampling_arguments
from backend.errors import (
    InvalidRequestError,
    ModelNotReadyError,
    ModelOutputError,
    QueueFullError,
    RequestTimeoutError,
)
from backend.media.resize import PixelBounds
from backend.settings import Settings

logger = logging.getLogger(__name__)

HEALTH_POLL_SECONDS = 1.0  # how often an idle engine checks that its engine core is alive


@dataclass
class VllmPrompt(TokenPrompt):
    """A rendered conversation and the pixel bounds its images were resized within."""

    bounds: PixelBounds = field(default_factory=lambda: PixelBounds(1, 1))

    def engine_input(self) -> dict[str, Any]:
        """vLLM's token prompt: ids, the images, and the bounds (so its processor keeps our sizes)."""
        prompt: dict[str, Any] = {"prompt_token_ids": self.token_ids}
        if self.images:
            # Our resize rule can end below a tiny lower bound (a side is never under 28 pixels); bounds that
            # hold every image as it is make vLLM's resize (the same rule) leave each one unchanged.
            areas = [width * height for width, height in self.resized_image_sizes]
            prompt["multi_modal_data"] = {"image": self.images}
            prompt["mm_processor_kwargs"] = {
                "min_pixels": min(self.bounds.min_pixels, *areas),
                "max_pixels": max(self.bounds.max_pixels, *areas),
            }
        return prompt


class VllmEngine(EngineClient):
    """Starts `AsyncLLM` in the background, then serves generations through it until shutdown."""

    name = "vllm"

    def __init__(self, settings: Settings, reason: str = "ENGINE=vllm") -> None:
        super().__init__(settings.model_name)
        self.settings = settings
        self.reason = reason  # why this engine was chosen (ENGINE=auto explains itself)
        self._llm: Any = None
        self._checkpoint: CheckpointInfo | None = None
        self._renderer: ChatPromptRenderer | None = None
        self._load_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self._tasks: dict[str, asyncio.Task] = {}  # request id -> the task that drives it
        self._shutting_down = False
        self.step_stats = StepStats()
        self.load_seconds: float | None = None
        self.aborted_in_engine = 0  # requests aborted in vLLM (disconnects, timeouts, shutdown)
        self.prompt_count_mismatches = 0  # prompts vLLM counted differently from us (should stay 0)

    # --- life cycle ---

    async def start(self) -> None:
        """Resolve the checkpoint and start vLLM in the background (`/health` says `loading` meanwhile)."""
        self._load_task = asyncio.create_task(self._load(), name="vllm-load")

    async def wait_until_loaded(self) -> None:
        """Wait for the load to end, successfully or not."""
        if self._load_task is not None:
            await asyncio.shield(self._load_task)

    async def _load(self) -> None:
        started = time.perf_counter()
        try:
            self._checkpoint = await to_thread.run_sync(self._read_checkpoint)
            self._llm = await to_thread.run_sync(self._start_vllm, self._checkpoint)
        except Exception as exc:  # reported by /health and the log; the server stays up to say so
            logger.exception("starting vLLM on %s failed", self.settings.model_id)
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = "error"
            return
        checkpoint = self._checkpoint
        self._renderer = ChatPromptRenderer(
            checkpoint.tokenizer,
            checkpoint.chat_template,
            checkpoint.image_token_id,
            system_prompt=self.settings.system_prompt,
            max_prompt_tokens=checkpoint.max_model_len,
        )
        self._model = ServedModel(
            max_model_len=checkpoint.max_model_len,
            accepts_images=checkpoint.accepts_images,
            generation_defaults=checkpoint.generation_defaults,
            resolved_revision=checkpoint.resolved_revision,
        )
        self.load_seconds = time.perf_counter() - started
        logger.info(
            "vLLM serves %s (%s) after %.1f s; KV cache: %s tokens",
            self.settings.model_id,
            checkpoint.architecture,
            self.load_seconds,
            self.step_stats.kv_cache_tokens,
        )
        self.state = "ready"
        if self._shutting_down:
            return
        self._watch_task = asyncio.create_task(self._watch_engine_core(), name="vllm-watch")

    def _read_checkpoint(self) -> CheckpointInfo:
        folder, revision = resolve_checkpoint(self.settings)
        return read_checkpoint(self.settings, folder, revision, read_config(folder))

    def _start_vllm(self, checkpoint: CheckpointInfo) -> Any:
        """Build `AsyncLLM` (blocking: it waits for the engine core to load the model and size its cache)."""
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # vLLM's CPU build sizes its KV cache from this variable rather than from a memory share (the engine
        # core, a child process, inherits it); CPU_KV_CACHE_GIB is the setting that decides.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{self.settings.cpu_kv_cache_gib:g}"
        # vLLM forks its engine core on GPUs by default; forking this process (uvicorn's threads, its listening
        # socket, a load running in a worker thread) is unsafe, so the core is always spawned.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        arguments = engine_arguments(self.settings, str(checkpoint.folder), checkpoint.max_model_len)
        logger.info("starting vLLM: %s", arguments)
        return AsyncLLM.from_engine_args(
            AsyncEngineArgs(**arguments), stat_loggers=[stat_logger_factory(self.step_stats)]
        )

    async def _watch_engine_core(self) -> None:
        """Notice an engine core that died while nothing ran (a running request notices at once)."""
        while self._state == "ready" and not self._shutting_down:  # `state` reads `loading` during WARMUP
            if self._llm.errored:
                self._die(self._llm.dead_error)
                return
            await asyncio.sleep(HEALTH_POLL_SECONDS)

    def _die(self, exc: BaseException) -> None:
        """The engine core is gone for good: say so in /health; everyone waiting gets 503."""
        if self.error_code == "engine_dead":
            return
        logger.critical("vLLM's engine core stopped: %s", exc)
        self.error = f"vLLM's engine core stopped ({type(exc).__name__}: {exc}); restart the server."
        self.error_code = "engine_dead"
        self.state = "error"

    async def shutdown(self) -> None:
        """Abort every generation (each ends with `abort`), then stop vLLM and its engine core process."""
        self._shutting_down = True
        if self._load_task is not None and not self._load_task.done():
            await asyncio.shield(self._load_task)  # vLLM's start cannot be interrupted half-way
        for task in list(self._tasks.values()):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    # --- requests ---

    async def prepare(self, turns: list[ChatTurn], bounds: PixelBounds | None = None) -> VllmPrompt:
        """Template, tokenise and resize images in a worker thread (CPU work kept off the event loop)."""
        self.require_loaded()
        assert self._renderer is not None
        bounds = bounds or PixelBounds(self.settings.min_pixels, self.settings.max_pixels)
        rendered = await to_thread.run_sync(self._renderer.render, turns, bounds)
        return VllmPrompt(**{item.name: getattr(rendered, item.name) for item in fields(rendered)}, bounds=bounds)

    async def prepare_raw(self, prompt: str | list[int]) -> VllmPrompt:
        """A legacy completion's prompt as token ids (tokenised in a worker thread)."""
        self.require_loaded()
        assert self._renderer is not None
        rendered = await to_thread.run_sync(self._renderer.raw_prompt, prompt)
        bounds = PixelBounds(self.settings.min_pixels, self.settings.max_pixels)
        return VllmPrompt(token_ids=rendered.token_ids, bounds=bounds)

    def decode(self, token_ids: list[int]) -> str:
        """Token ids as text, control tokens included."""
        assert self._renderer is not None
        return self._renderer.decode(token_ids)

    def generate_many(self, choices: list[tuple[str, SamplingParams]], prompt: VllmPrompt) -> list[GenerationStream]:
        """Queue one generation per (request id, sampling), all or none: beyond MAX_BATCH_SIZE running and
        MAX_QUEUE waiting, a 429 leaves nothing queued."""
        self.require_loaded()
        if self._shutting_down:
            raise ModelNotReadyError("The server is shutting down.", code="shutting_down")
        capacity = self.settings.max_batch_size + self.settings.max_queue
        if len(self._tasks) + len(choices) > capacity:
            raise QueueFullError(self.settings.max_queue, retry_after_seconds=max(1, len(self._tasks) // 8))
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        assert self._checkpoint is not None
        eos = self._checkpoint.eos_token_ids
        try:  # every choice's parameters first: one that vLLM refuses must leave none queued
            samplings = [
                VllmSamplingParams(**sampling_arguments(params, eos), output_kind=RequestOutputKind.DELTA)
                for _, params in choices
            ]
        except Exception as exc:
            raise self._translate(exc) from exc
        streams = []
        for (request_id, _), sampling in zip(choices, samplings):
            queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
            task = asyncio.create_task(self._drive(request_id, prompt, sampling, queue), name=request_id)
            self._tasks[request_id] = task
            task.add_done_callback(lambda task, queue=queue: self._finish_task(task, prompt, queue))
            streams.append(GenerationStream(queue, _cancel_once(task)))
        return streams

    def _finish_task(self, task: asyncio.Task, prompt: VllmPrompt, queue: asyncio.Queue) -> None:
        """A request cancelled before its task ever ran still leaves `_tasks` and ends with `abort` (a task
        that ran does both itself)."""
        if task.cancelled():
            self._tasks.pop(task.get_name(), None)
            self._emit(queue, Finished("abort", prompt.prompt_tokens, 0, 0.0, None, 0.0))

    async def _drive(self, request_id: str, prompt: VllmPrompt, sampling: Any, queue: asyncio.Queue) -> None:
        """Run one request in vLLM and turn its outputs into our events; ends with exactly one final event.
        The request leaves `_tasks` before that event, so its slot is free when its client hears it ended."""
        submitted = time.perf_counter()
        first_token_at: float | None = None
        completion_tokens = 0
        counted = False
        final: Any = None
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_seconds

        def end(event: GenerationEvent) -> None:
            self._tasks.pop(request_id, None)
            self._emit(queue, event)

        try:
            async with asyncio.timeout_at(deadline):
                async for output in self._llm.generate(prompt.engine_input(), sampling, request_id):
                    if not counted and output.prompt_token_ids is not None:
                        self._check_prompt_count(len(output.prompt_token_ids), prompt.prompt_tokens)
                        counted = True
                    completion = output.outputs[0]
                    if completion.token_ids and first_token_at is None:
                        first_token_at = time.perf_counter()
                    completion_tokens += len(completion.token_ids)
                    if output.finished:
                        final = output
                        completion_tokens -= ended_by_end_token(completion.finish_reason, completion.stop_reason)
                    if completion.text:
                        self._emit(queue, TextDelta(completion.text, completion_tokens))
        except TimeoutError:
            await self._abort_in_engine(request_id)
            end(Failed(RequestTimeoutError.after(self.settings.request_timeout_seconds)))
            return
        except asyncio.CancelledError:  # the client left, a sibling choice failed, or the server stops
            try:
                await self._abort_in_engine(request_id)
            except asyncio.CancelledError:  # cancelled again while aborting: the abort runs on (shielded)
                pass
        except Exception as exc:
            end(Failed(self._translate(exc)))
            return
        finish_reason = final.outputs[0].finish_reason if final is not None else "abort"
        if finish_reason not in ("stop", "length", "abort"):  # vLLM's "error" (and others): its request failed
            end(Failed(ModelOutputError(f"The engine could not finish this request ({finish_reason}); retry it.")))
            return
        now = time.perf_counter()
        queue_seconds, ttft = _timings(final, submitted, first_token_at)
        end(
            Finished(
                finish_reason=finish_reason,
                prompt_tokens=prompt.prompt_tokens,
                completion_tokens=completion_tokens,
                queue_seconds=queue_seconds,
                time_to_first_token=ttft,
                generation_seconds=max(now - submitted - queue_seconds, 0.0),
            )
        )

    async def _abort_in_engine(self, request_id: str) -> None:
        """Make sure vLLM stops the request (its generate aborts only what it had fully added); repeating an
        abort is harmless. Shielded: a second cancellation must not interrupt it half-way."""
        if self._llm is None:
            return
        self.aborted_in_engine += 1
        try:
            await asyncio.shield(self._llm.abort(request_id))
        except Exception:  # a dead engine core has nothing left to abort
            logger.debug("abort of %s failed", request_id, exc_info=True)

    def _check_prompt_count(self, vllm_count: int, our_count: int) -> None:
        """The usage we report is our count; vLLM's must agree (it would not if its processor resized an
        image again). A disagreement is logged and counted in /health, never silently reported."""
        if vllm_count != our_count:
            self.prompt_count_mismatches += 1
            logger.warning("vLLM counts %d prompt tokens where we counted %d", vllm_count, our_count)

    def _emit(self, queue: asyncio.Queue, event: GenerationEvent) -> None:
        """Hand an event to its stream; final events to the listeners (stats, metrics) too."""
        if not isinstance(event, TextDelta):
            self._notify(event)
        queue.put_nowait(event)

    def _translate(self, exc: Exception) -> Exception:
        """vLLM's failures in our terms: a dead engine core is a 503, an input it refuses a 400 (vLLM wraps
        a ValueError from its input processing in EngineGenerateError), anything else stays a 500."""
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, EngineDeadError) or (self._llm is not None and self._llm.errored):
            self._die(exc)
            return self.unavailable()
        refused = exc if isinstance(exc, VLLMClientError | ValueError) else None
        if refused is None and isinstance(exc.__cause__, VLLMClientError | ValueError):
            refused = exc.__cause__
        if refused is not None:
            return InvalidRequestError(f"The model cannot take this request: {refused}")
        logger.error("a vLLM generation failed", exc_info=exc)
        return exc

    # --- observation ---

    def queue_sizes(self) -> tuple[int, int]:
        """(running, waiting) requests: ours in flight, split as vLLM's scheduler last reported."""
        in_flight = len(self._tasks)
        running = min(in_flight, self.step_stats.running if self.step_stats.steps else in_flight)
        running = min(running, self.settings.max_batch_size)
        return running, in_flight - running

    def memory(self) -> dict[str, Any]:
        """This process's and the engine core's RSS, and each GPU's used and total bytes (NVML)."""
        return memory_report(child_pids())

    def report(self) -> EngineReport:
        """Engine choice, KV cache, queue and memory for `/health`."""
        checkpoint = self._checkpoint
        details: dict[str, Any] = {
            "engine_reason": self.reason,
            "architecture": checkpoint.architecture if checkpoint is not None else None,
            "load_seconds": round(self.load_seconds, 3) if self.load_seconds is not None else None,
            "tensor_parallel_size": self.settings.tensor_parallel_size,
            "kv_cache": self.step_stats.as_dict(),
        }
        if self._llm is not None:
            details["dtype"] = str(self._llm.model_config.dtype).removeprefix("torch.")
        running, waiting = self.queue_sizes()
        queue = {
            "running": running,
            "waiting": waiting,
            "max_batch_size": self.settings.max_batch_size,
            "max_queue": self.settings.max_queue,
            "aborted_in_engine": self.aborted_in_engine,
            # vLLM's own count of requests it still holds: 0 once every abort has really landed.
            "engine_unfinished": self._llm.get_num_unfinished_requests() if self._llm is not None else 0,
            "prompt_count_mismatches": self.prompt_count_mismatches,
            "engine_steps": self.step_stats.steps,
        }
        return EngineReport(self.name, details, queue, self.stats, self.memory())


def _cancel_once(task: asyncio.Task):
    """The stream's `cancel`: the handler, the stream and the response may each call it; the task is cancelled
    once, so that its own clean-up (the abort in vLLM, the final event) is not interrupted by a second one."""
    cancelled = False

    def cancel() -> None:
        nonlocal cancelled
        if not cancelled:
            cancelled = True
            task.cancel()

    return cancel


def _timings(final: Any, submitted: float, first_token_at: float | None) -> tuple[float, float | None]:
    """(queue seconds, time to first token from the start of the work), from vLLM's engine-core timestamps
    where it reported them, else from what this process saw."""
    metrics = getattr(final, "metrics", None)
    queued, scheduled, first = (getattr(metrics, name, 0.0) for name in ("queued_ts", "scheduled_ts", "first_token_ts"))
    if queued and scheduled and first:
        return max(scheduled - queued, 0.0), max(first - scheduled, 0.0)
    ttft = first_token_at - submitted if first_token_at is not None else None
    return 0.0, ttft
