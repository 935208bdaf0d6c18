"""OpenAI-compatible request and response models of `POST /v1/chat/completions`.

Field names are OpenAI's. Types are strict (a `"5"` is not a number, `5.5` is not an integer), fields the
OpenAI client may send but that change nothing here (`user`, `metadata`, `store`, ...) are accepted and
ignored, and fields that would change the answer in a way this server cannot honour are refused with a 400
(`unsupported_fields`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from backend.errors import InvalidRequestError
from backend.protocol.common import RequestBody, Usage

# A JSON number: integers are accepted (and become floats), strings and booleans are not. A single type (not
# a union) so that bounds appear in the OpenAPI schema as JSON Schema's minimum/maximum.
Number = StrictFloat


class TextPart(BaseModel):
    """`{"type": "text", "text": "..."}`"""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ImageURL(BaseModel):
    """The `image_url` object: a `data:` URI (or bare base64); `detail` is accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    url: StrictStr = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    """`{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}}`"""

    model_config = ConfigDict(extra="ignore")
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    """One message. `developer` is OpenAI's newer name for `system` and is treated as one."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None


class StreamOptions(BaseModel):
    """`stream_options`: `include_usage` adds a final chunk with the token counts."""

    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


# Fields that would change the answer in ways this server does not implement: refused, never ignored.
UNSUPPORTED_WHEN_SET = {
    "tools": "tool calling",
    "functions": "function calling",
    "logprobs": "log probabilities",
    "top_logprobs": "log probabilities",
    "logit_bias": "logit_bias",
    "audio": "audio output",
    "prediction": "predicted outputs",
}


class GenerationOptions(RequestBody):
    """Sampling, length and image-size fields shared by chat completions and `/v1/vision/analyze`."""

    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (user, metadata, store, ...) are ignored

    model: StrictStr | None = None
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=-1, description="-1 or 0: off")
    min_p: Number | None = Field(None, ge=0, le=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    stop: StrictStr | list[StrictStr] | None = None
    # OpenAI's seed is a 64-bit signed integer; anything wider cannot seed a generator.
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    repetition_penalty: Number | None = Field(None, gt=0, le=10)
    n: StrictInt = Field(1, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = Field(False, description="vLLM extension: generate max_tokens even past the end token")
    min_pixels: StrictInt | None = Field(None, gt=0, description="lower the server's MIN_PIXELS for this request")
    max_pixels: StrictInt | None = Field(None, gt=0, description="lower the server's MAX_PIXELS for this request")

    @property
    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` wins over the older `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """`stop` as a tuple of non-empty strings."""
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(stop for stop in stops if stop)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    @model_validator(mode="after")
    def _stream_options_need_a_stream(self) -> GenerationOptions:
        """OpenAI refuses `stream_options` without `stream: true` (it would change nothing, silently)."""
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError(
                "`stream_options` is only allowed when `stream` is true.",
                param="stream_options",
                code="invalid_value",
            )
        return self

    def check_limits(self, max_n: int) -> None:
        """Refuse too many stop strings or choices."""
        if isinstance(self.stop, list) and len(self.stop) > 16:
            raise InvalidRequestError("At most 16 stop strings are allowed.", param="stop")
        if self.n > max_n:
            raise InvalidRequestError(f"n must be at most {max_n} on this server (got {self.n}).", param="n")


class ChatCompletionRequest(GenerationOptions):
    """The body of a chat completion request."""

    messages: list[ChatMessage] = Field(min_length=1)
    response_format: dict[str, Any] | None = None
    tool_choice: Any = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None

    def check_supported(self, max_n: int) -> None:
        """Refuse what would silently change the answer: tools, logprobs, JSON modes, too many stops or choices."""
        for name, feature in UNSUPPORTED_WHEN_SET.items():
            value = getattr(self, name, None) if name in type(self).model_fields else (self.model_extra or {}).get(name)
            if value not in (None, False, [], {}):
                raise InvalidRequestError(
                    f"This server does not support {feature}; remove `{name}` from the request.",
                    param=name,
                    code="unsupported_field",
                )
        if self.tool_choice not in (None, "none"):
            raise InvalidRequestError(
                "This server does not support tool calling; remove `tool_choice`.",
                param="tool_choice",
                code="unsupported_field",
            )
        for index, message in enumerate(self.messages):
            if message.content is None and message.role != "assistant":
                # OpenAI answers 400: only an assistant turn (one that called tools) may have no content.
                raise InvalidRequestError(
                    f"messages[{index}] ({message.role}) has no content; give it a string or a list of parts.",
                    param=f"messages[{index}].content",
                    code="invalid_value",
                )
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise InvalidRequestError(
                f"response_format type {self.response_format.get('type')!r} is not supported; only 'text' is.",
                param="response_format",
                code="unsupported_field",
            )
        self.check_limits(max_n)


class AssistantMessage(BaseModel):
    """The generated message."""

    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    """One of the `n` answers."""

    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    """A complete (non-streaming) answer."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class ChunkDelta(BaseModel):
    """What a streamed chunk adds: the role (first chunk), then content pieces; empty on the last chunk."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    """One choice's part of a streamed chunk."""

    index: int
    delta: ChunkDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed answer (`object: chat.completion.chunk`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
