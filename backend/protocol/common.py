"""Models shared by several endpoints."""

from __future__ import annotations

from pydantic import BaseModel


class Usage(BaseModel):
    """Token counts of one request, from the real tokenizer (image tokens count as prompt tokens)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        """Usage with the total filled in."""
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class ErrorDetail(BaseModel):
    """The inside of the OpenAI error envelope."""

    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """`{"error": {...}}`: the body of every failure."""

    error: ErrorDetail
