"""Request and response models of `POST /v1/vision/analyze` (image + question, e.g. tongue diagnosis)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from backend.protocol.chat import GenerationOptions
from backend.protocol.common import Usage

Task = Literal["tongue", "face", "herb", "general"]


class VisionAnalyzeRequest(GenerationOptions):
    """The JSON body (multipart forms carry the same fields, with images as file parts named `image`).

    `image` is required (a request without one is a 400); it is optional in the model only because a form's
    images arrive as file parts, not in this field."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"required": ["image"]})

    image: StrictStr | list[StrictStr] | None = Field(
        None, description="data: URI, bare base64, or an http(s) URL from IMAGE_URL_ALLOWED_DOMAINS; or a list"
    )
    prompt: StrictStr | None = Field(None, max_length=20000, description="the question; added after the task's preset")
    task: Task | None = Field(None, description="tongue (舌诊), face (面诊), herb (中药), general; see README")


class AnalyzedImage(BaseModel):
    """One image as the model saw it."""

    source: str
    original_width: int
    original_height: int
    width: int  # after Qwen2.5-VL's resize (multiples of 28 within MIN_PIXELS..MAX_PIXELS)
    height: int
    image_tokens: int


class VisionTimings(BaseModel):
    """Where the time went, in milliseconds."""

    preprocessing_ms: float  # fetching, decoding, resizing, tokenising
    queue_ms: float  # waiting for the inference thread
    time_to_first_token_ms: float | None  # prefill (vision tower included), from the start of the work
    generation_ms: float  # prefill + decode


class VisionAnalyzeResponse(BaseModel):
    """The analysis and what it cost."""

    id: str
    object: Literal["vision.analysis"] = "vision.analysis"
    created: int
    model: str
    task: Task | None
    analysis: str  # the model's answer, followed by the disclaimer line when one is configured
    disclaimer: str | None
    finish_reason: Literal["stop", "length"]
    images: list[AnalyzedImage]
    usage: Usage
    timings: VisionTimings
