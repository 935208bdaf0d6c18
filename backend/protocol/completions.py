"""OpenAI-compatible request and response models of `POST /v1/completions` (legacy text completions).

The prompt is raw text (the client writes the chat template itself, control tokens included) or token ids,
one prompt or several. Sampling fields are the chat endpoint's (`GenerationOptions`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr

from backend.errors import InvalidRequestError
from backend.protocol.chat import GenerationOptions
from backend.protocol.common import Usage

MAX_PROMPTS = 16  # prompts in one request (each with its `n` choices)
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint (and vLLM's)

Prompt = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(GenerationOptions):
    """The body of a legacy completion request."""

    prompt: Prompt = Field(description="text, a list of texts, token ids, or a list of token id lists")
    echo: StrictBool = Field(False, description="answer with the prompt followed by the completion")
    logprobs: StrictInt | None = None
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request, text or ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(item, int) for item in prompt):
            return [list(prompt)]
        return list(prompt)

    def check_supported(self, max_n: int) -> None:
        """Refuse what this server would otherwise silently ignore, and too many prompts or choices."""
        for name, feature in (("logprobs", "log probabilities"), ("suffix", "suffixes (fill-in-the-middle)")):
            if getattr(self, name) is not None:
                raise InvalidRequestError(
                    f"This server does not support {feature}; remove `{name}` from the request.",
                    param=name,
                    code="unsupported_field",
                )
        if self.best_of not in (None, 1, self.n):
            raise InvalidRequestError("best_of must equal n on this server.", param="best_of", code="invalid_value")
        if not self.prompts:
            raise InvalidRequestError("The prompt list is empty.", param="prompt", code="invalid_value")
        if len(self.prompts) > MAX_PROMPTS:
            raise InvalidRequestError(f"At most {MAX_PROMPTS} prompts per request.", param="prompt")
        self.check_limits(max_n)


class CompletionChoice(BaseModel):
    """One completion (index = prompt index × n + choice)."""

    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    """A whole answer (non-streaming), or one streamed chunk (`choices` with one piece each, then `usage`)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
