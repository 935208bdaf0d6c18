"""One sequence's life on the inference thread: prefill, then a token per step until it ends.

The decode loop is written out rather than delegated to `model.generate` because serving needs, at every
step and for every sequence of a batch on its own: its random generator (a seeded request must not depend on
what it is batched with), a check for non-finite logits (float16 overflow), text pieces for streaming with
stop strings cut out, an abort flag a disconnected client sets, and a deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from backend.engines.events import Failed, Finished, GenerationEvent, TextDelta
from backend.engines.transformers_engine.loader import LoadedModel
from backend.engines.transformers_engine.prompt import ModelInputs
from backend.engines.transformers_engine.sampling import SamplingParams, choose_token, make_generator
from backend.engines.transformers_engine.text import IncrementalDetokenizer, StopStringMatcher
from backend.errors import ModelOutputError, RequestTimeoutError


@dataclass(eq=False)  # compared and hashed by identity: the engine keeps sets of jobs
class GenerationJob:
    """One sequence to generate, as handed to the inference thread."""

    request_id: str
    inputs: ModelInputs
    params: SamplingParams
    emit: Callable[[GenerationEvent], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)
    deadline: float | None = None  # perf_counter time after which the request is answered 504
    answered: bool = False  # a final event (Finished or Failed) was emitted

    def __post_init__(self) -> None:
        deliver = self.emit

        def emit(event: GenerationEvent) -> None:
            if isinstance(event, Finished | Failed):
                self.answered = True
            deliver(event)

        self.emit = emit

    def expired(self, now: float) -> bool:
        """Whether the request's time limit has passed."""
        return self.deadline is not None and now > self.deadline


def timeout_error(job: GenerationJob) -> RequestTimeoutError:
    """The 504 for a request that ran past REQUEST_TIMEOUT."""
    return RequestTimeoutError.after((job.deadline or job.submitted_at) - job.submitted_at)


def prompt_positions(loaded: LoadedModel, inputs: ModelInputs, device: torch.device):
    """Rotary positions of the prompt, and the position of the first generated token.

    Qwen2.5-VL uses 3-D (temporal, height, width) positions: an image advances the position by its larger
    side in merged patches, not by its token count. They are computed here and passed explicitly, because
    the model's own fallback keeps per-model state (`rope_deltas`) that the sequences of a batch would share.
    Text-only models use ordinary positions.
    """
    length = inputs.prompt_tokens
    if not loaded.accepts_images:
        return torch.arange(length, device=device).view(1, -1), length
    if inputs.image_grid_thw is None:
        return torch.arange(length, device=device).view(1, 1, -1).expand(3, 1, -1), length
    positions, _ = loaded.model.model.get_rope_index(
        inputs.input_ids.to(device),
        mm_token_type_ids=inputs.mm_token_type_ids.to(device),
        image_grid_thw=inputs.image_grid_thw.to(device),
    )
    return positions, int(positions.max()) + 1


@dataclass
class Prefilled:
    """The result of prefilling one or more prompts together (rows left-padded to one length)."""

    logits: torch.Tensor  # [rows, vocab]: each row's last-position logits
    cache: DynamicCache
    mask: torch.Tensor  # [rows, length]: 1 = prompt token, 0 = padding
    next_positions: list[int]


def prefill(loaded: LoadedModel, prompts: list[ModelInputs]) -> Prefilled:
    """Run prompts through the model in one forward pass; prompts with images must come alone.

    Several text prompts are left-padded to the longest: one larger matrix product costs far less than one
    small product per prompt, which matters when many requests arrive together.
    """
    device = loaded.device
    if len(prompts) == 1:
        inputs = prompts[0]
        input_ids = inputs.input_ids.to(device)
        positions, next_position = prompt_positions(loaded, inputs, device)
        mask = torch.ones_like(input_ids)
        next_positions = [next_position]
    else:
        assert all(inputs.pixel_values is None for inputs in prompts), "image prompts are prefilled alone"
        width = max(inputs.prompt_tokens for inputs in prompts)
        input_ids = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
        mask = torch.zeros_like(input_ids)
        for row, inputs in enumerate(prompts):
            input_ids[row, width - inputs.prompt_tokens :] = inputs.input_ids[0].to(device)
            mask[row, width - inputs.prompt_tokens :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        if loaded.accepts_images:
            positions = positions.unsqueeze(0).expand(3, -1, -1)
        next_positions = [inputs.prompt_tokens for inputs in prompts]
    cache = DynamicCache(config=loaded.model.config)
    step = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "position_ids": positions,
        "past_key_values": cache,
        "use_cache": True,
        "logits_to_keep": 1,
    }
    if len(prompts) == 1 and prompts[0].pixel_values is not None:
        step["pixel_values"] = prompts[0].pixel_values.to(device, loaded.dtype)
        step["image_grid_thw"] = prompts[0].image_grid_thw.to(device)
    output = loaded.model(**step)
    return Prefilled(output.logits[:, -1], cache, mask, next_positions)


class SequenceState:
    """Everything one sequence of a batch carries between steps, and what it tells its client."""

    def __init__(self, loaded: LoadedModel, job: GenerationJob, started: float) -> None:
        self.loaded = loaded
        self.job = job
        self.started = started
        self.prompt_ids = job.inputs.input_ids[0].to(loaded.device)
        self.output_ids: list[int] = []
        self.generator = make_generator(job.params.seed, loaded.device)
        self.detokenizer = IncrementalDetokenizer(loaded.tokenizer)
        self.stops = StopStringMatcher(job.params.stop)
        self.next_position = 0
        self.first_token_at: float | None = None
        params = job.params
        self._tracks_history = bool(
            params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
        )

    @property
    def params(self) -> SamplingParams:
        """The job's sampling parameters."""
        return self.job.params

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this sequence's last-position logits; non-finite logits end the request."""
        logits = logits.to(torch.float32, copy=True)
        if not bool(torch.isfinite(logits).all()):
            raise ModelOutputError(
                f"The model produced non-finite logits at answer token {len(self.output_ids) + 1} "
                f"({str(self.loaded.dtype).removeprefix('torch.')}): the answer would be garbage. "
                "Qwen models can overflow in float16; run with DTYPE=bfloat16 (or float32).",
                code="non_finite_logits",
            )
        history = (
            torch.tensor(self.output_ids, dtype=torch.long, device=self.loaded.device)
            if self._tracks_history
            else self.prompt_ids[:0]
        )
        token = choose_token(logits, self.prompt_ids, history, self.params, self.generator)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        return token

    def accept(self, token: int) -> str | None:
        """Take the chosen token and emit its text; the finish reason if the sequence ends here, else None."""
        if token in self.loaded.eos_token_ids and not self.params.ignore_eos:
            return "stop"
        self.output_ids.append(token)
        text = self.stops.feed(self.detokenizer.push(token))
        self.job.emit(TextDelta(text, len(self.output_ids)))
        if self.stops.stopped:
            return "stop"
        if len(self.output_ids) >= self.params.max_new_tokens:
            return "length"
        return None

    def finish(self, reason: str) -> None:
        """Emit what the detokenizer and stop matcher still hold, then the Finished event."""
        if not self.stops.stopped:
            tail = self.stops.feed(self.detokenizer.flush())
            if self.stops.stopped:
                reason = "stop"
            else:
                tail += self.stops.flush()
            if tail:
                self.job.emit(TextDelta(tail, len(self.output_ids)))
        ttft = self.first_token_at - self.started if self.first_token_at is not None else None
        self.job.emit(
            Finished(
                reason,
                self.job.inputs.prompt_tokens,
                len(self.output_ids),
                self.started - self.job.submitted_at,
                ttft,
                time.perf_counter() - self.started,
            )
        )

    def fail(self, error: Exception) -> None:
        """End this sequence with an error for its client."""
        self.job.emit(Failed(error))
