"""Models of `GET /v1/models` (OpenAI's list format, plus vLLM's `max_model_len`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelCard(BaseModel):
    """One served model."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    max_model_len: int | None = None


class ModelList(BaseModel):
    """The served models (exactly one: this server loads one model)."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
