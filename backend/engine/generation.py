"""The decode loop: prefill the prompt, then one token per step until a stop, the length limit, or an abort.

It runs on the inference thread only. It is written out rather than delegated to `model.generate` because
serving needs, at every step: the per-request random generator (a seeded request must not depend on other
requests), a check for non-finite logits (float16 overflow), text pieces for streaming with stop strings cut
out, and an abort flag that a disconnected client sets.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from backend.engine.devices import free_accelerator_cache
from backend.engine.loader import LoadedModel
from backend.engine.prompt import ModelInputs
from backend.engine.sampling import SamplingParams, choose_token, make_generator
from backend.engine.text import IncrementalDetokenizer, StopStringMatcher
from backend.errors import ModelOutputError, OutOfMemoryError


@dataclass(frozen=True)
class TextDelta:
    """New answer text (may be empty when a token only completed part of a character)."""

    text: str
    completion_tokens: int


@dataclass(frozen=True)
class Finished:
    """The answer is complete. Timings are in seconds."""

    finish_reason: str  # "stop", "length" or "abort"
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float
    time_to_first_token: float | None  # from the start of the work, not counting the queue
    generation_seconds: float


@dataclass(frozen=True)
class Failed:
    """The generation broke; `error` is raised to whoever reads the stream."""

    error: Exception


GenerationEvent = TextDelta | Finished | Failed


@dataclass(eq=False)  # compared and hashed by identity: the engine keeps a set of pending jobs
class GenerationJob:
    """One sequence to generate, as handed to the inference thread."""

    request_id: str
    inputs: ModelInputs
    params: SamplingParams
    emit: Callable[[GenerationEvent], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)


def initial_positions(loaded: LoadedModel, inputs: ModelInputs, device: torch.device):
    """Rotary positions of the prompt, and the position of the first generated token.

    Qwen2.5-VL uses 3-D (temporal, height, width) positions: an image advances the position by its larger
    side in merged patches, not by its token count. They are computed here and passed explicitly, because
    the model's own fallback keeps per-model state (`rope_deltas`) that concurrent requests would share.
    Text-only models take ordinary positions from the cache length.
    """
    if not loaded.accepts_images:
        return None, inputs.prompt_tokens
    length = inputs.prompt_tokens
    if inputs.image_grid_thw is None:
        positions = torch.arange(length, device=device).view(1, 1, -1).expand(3, 1, -1)
        return positions, length
    positions, _ = loaded.model.model.get_rope_index(
        inputs.input_ids.to(device),
        mm_token_type_ids=inputs.mm_token_type_ids.to(device),
        image_grid_thw=inputs.image_grid_thw.to(device),
    )
    return positions, int(positions.max()) + 1


def run_generation(loaded: LoadedModel, job: GenerationJob) -> None:
    """Generate one answer for `job`, emitting TextDelta events and one Finished or Failed event."""
    started = time.perf_counter()
    queue_seconds = started - job.submitted_at
    prompt_tokens = job.inputs.prompt_tokens
    if job.cancelled.is_set():  # the client left while the request waited
        job.emit(Finished("abort", prompt_tokens, 0, queue_seconds, None, 0.0))
        return
    try:
        finish_reason, completion_tokens, first_token_at = _decode(loaded, job)
    except torch.OutOfMemoryError:
        free_accelerator_cache()
        job.emit(
            Failed(
                OutOfMemoryError(
                    "The GPU ran out of memory on this request; try fewer or smaller images, a shorter "
                    "conversation or a lower max_tokens. The server is still running.",
                    code="out_of_memory",
                )
            )
        )
        return
    except Exception as exc:  # reported to this request only; the inference thread carries on
        job.emit(Failed(exc))
        return
    ended = time.perf_counter()
    ttft = first_token_at - started if first_token_at is not None else None
    job.emit(Finished(finish_reason, prompt_tokens, completion_tokens, queue_seconds, ttft, ended - started))


def _decode(loaded: LoadedModel, job: GenerationJob) -> tuple[str, int, float | None]:
    """The loop itself; returns (finish reason, completion tokens, time the first token was chosen)."""
    model, device, params = loaded.model, loaded.device, job.params
    inputs = job.inputs
    input_ids = inputs.input_ids.to(device)
    positions, next_position = initial_positions(loaded, inputs, device)
    step = {
        "input_ids": input_ids,
        "position_ids": positions,
        "past_key_values": DynamicCache(config=model.config),
        "use_cache": True,
        "logits_to_keep": 1,
    }
    if inputs.pixel_values is not None:
        step["pixel_values"] = inputs.pixel_values.to(device, loaded.dtype)
        step["image_grid_thw"] = inputs.image_grid_thw.to(device)

    generator = make_generator(params.seed, device)
    tracks_history = params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
    prompt_ids = input_ids[0]
    output_ids: list[int] = []
    detokenizer = IncrementalDetokenizer(loaded.tokenizer)
    stops = StopStringMatcher(params.stop)
    first_token_at: float | None = None
    finish_reason = "length"

    with torch.inference_mode():
        while len(output_ids) < params.max_new_tokens:
            output = model(**step)
            logits = output.logits[0, -1].to(torch.float32, copy=True)
            if not bool(torch.isfinite(logits).all()):
                raise ModelOutputError(
                    f"The model produced non-finite logits at answer token {len(output_ids) + 1} "
                    f"({str(loaded.dtype).removeprefix('torch.')}): the answer would be garbage. "
                    "Qwen models can overflow in float16; run with DTYPE=bfloat16 (or float32).",
                    code="non_finite_logits",
                )
            history = torch.tensor(output_ids, dtype=torch.long, device=device) if tracks_history else prompt_ids[:0]
            token = choose_token(logits, prompt_ids, history, params, generator)
            if first_token_at is None:
                first_token_at = time.perf_counter()
            if token in loaded.eos_token_ids and not params.ignore_eos:
                finish_reason = "stop"
                break
            output_ids.append(token)
            text = stops.feed(detokenizer.push(token))
            job.emit(TextDelta(text, len(output_ids)))
            if stops.stopped:
                return "stop", len(output_ids), first_token_at
            if job.cancelled.is_set():
                finish_reason = "abort"
                break
            step = {
                "input_ids": torch.tensor([[token]], dtype=torch.long, device=device),
                "position_ids": _next_positions(positions, next_position, device),
                "past_key_values": output.past_key_values,
                "use_cache": True,
            }
            next_position += 1

    tail = stops.feed(detokenizer.flush())
    if stops.stopped:
        finish_reason = "stop"
    else:
        tail += stops.flush()
    if tail:
        job.emit(TextDelta(tail, len(output_ids)))
    return finish_reason, len(output_ids), first_token_at


def _next_positions(prompt_positions: torch.Tensor | None, position: int, device: torch.device):
    """Positions for one new token: the same index on all three rotary axes (None for text-only models)."""
    if prompt_positions is None:
        return None
    return torch.full((3, 1, 1), position, dtype=torch.long, device=device)
