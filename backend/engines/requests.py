"""What a request asks of an engine, in engine-neutral terms: the conversation, how to sample, and the
prompt an engine prepared from it (with its token counts known before generation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image


@dataclass
class ChatTurn:
    """One message of the conversation: a role and its parts, each a text or a decoded image."""

    role: str
    parts: list[str | Image.Image]
    source: str = "messages"  # where the turn came from, for error messages ("messages[2]")
    # Where each image came from, for error messages ("messages[0].content[1]").
    image_sources: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its tokens and when it stops. Built from the API request."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # transformers' multiplicative penalty on prompt and answer tokens
    presence_penalty: float = 0.0  # OpenAI's additive penalties on tokens already in the answer
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: always generate max_new_tokens (benchmarks, tests)

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or top-k 1) means: always the most likely token."""
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults from the checkpoint's `generation_config.json` (requests override them)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None


class PreparedPrompt(Protocol):
    """A conversation made ready for one engine (its own tensors or token ids inside), with what the API
    reports about it known before generation."""

    @property
    def prompt_tokens(self) -> int:
        """Tokens in the prompt, image tokens included."""

    image_token_counts: list[int]  # per image, in order
    resized_image_sizes: list[tuple[int, int]]  # (width, height) as the model sees each image
