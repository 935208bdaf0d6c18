"""Models shared by several endpoints."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, model_validator

from backend.errors import InvalidRequestError

_SURROGATE = re.compile("[\ud800-\udfff]")


def find_lone_surrogate(value: Any) -> str | None:
    """Where in a parsed JSON value a string holds a lone UTF-16 surrogate (JSON's `"\\ud800"`), if anywhere.

    Such a string is not Unicode text: the tokenizer, the log and the JSON answer would all fail on it.
    Walked with a stack, not recursion: a body may nest as deep as the JSON parser allows.
    """
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return path or "body"
            continue
        if isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and _SURROGATE.search(key):
                    return path or "body"
                stack.append((child, f"{path}.{key}" if path else str(key)))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{index}]") for index, child in enumerate(item))
    return None


class RequestBody(BaseModel):
    """Base of request bodies: text must be real Unicode (a lone surrogate is a 400 that names the field)."""

    @model_validator(mode="before")
    @classmethod
    def _reject_lone_surrogates(cls, data: Any) -> Any:
        where = find_lone_surrogate(data)
        if where is not None:
            # Raised as an API error (pydantic passes it through): a validation error would have to repeat
            # the bad string in its own message.
            raise InvalidRequestError(
                f"`{where}` contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is not "
                "valid Unicode text.",
                param=where,
                code="invalid_unicode",
            )
        return data


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
