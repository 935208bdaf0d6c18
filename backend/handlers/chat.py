"""The chat completion handler: from a validated request to generation jobs and back to an OpenAI answer."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from backend.engines import EngineClient
from backend.engines.events import KEEPALIVE, Finished, GenerationResult, GenerationStream
from backend.engines.requests import ChatTurn, GenerationDefaults, PreparedPrompt, SamplingParams
from backend.errors import InvalidRequestError, ModelNotFoundError
from backend.handlers.streaming import DONE_EVENT, KEEPALIVE_COMMENT, collect_all, error_event, sse_event
from backend.media import DecodedImage, ImageInput, ImageIntake
from backend.media.resize import PixelBounds
from backend.protocol.chat import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    Choice,
    ChunkChoice,
    ChunkDelta,
    GenerationOptions,
)
from backend.protocol.common import Usage
from backend.settings import Settings


def check_model_name(requested: str | None, settings: Settings) -> None:
    """Accept no name, the served name, or MODEL_ID; anything else is a 404 `model_not_found`."""
    if requested and requested not in (settings.model_name, settings.model_id):
        raise ModelNotFoundError(requested, settings.model_name)


def collect_images(messages: list[ChatMessage]) -> list[ImageInput]:
    """Every image part, in order, with where it sits; images are allowed in user messages only."""
    images = []
    for index, message in enumerate(messages):
        if isinstance(message.content, list):
            for part_index, part in enumerate(message.content):
                if part.type != "image_url":
                    continue
                source = f"messages[{index}].content[{part_index}]"
                if message.role != "user":
                    raise InvalidRequestError(
                        f"Images are only allowed in user messages; {source} is in a {message.role} message.",
                        param=source,
                    )
                images.append(ImageInput(source, url=part.image_url.url))
    return images


def messages_to_turns(messages: list[ChatMessage], images: list[DecodedImage]) -> list[ChatTurn]:
    """OpenAI messages -> engine turns, with the decoded images in place of the image parts."""
    decoded = iter(images)
    turns = []
    for index, message in enumerate(messages):
        source = f"messages[{index}]"
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str) or message.content is None:
            turns.append(ChatTurn(role, [message.content or ""], source=source))
            continue
        parts: list = []
        image_sources: list[str] = []
        for part in message.content:
            if part.type == "text":
                parts.append(part.text)
            else:
                image = next(decoded)
                parts.append(image.image)
                image_sources.append(image.source)
        turns.append(ChatTurn(role, parts, source=source, image_sources=image_sources))
    return turns


def resolve_max_new_tokens(requested: int | None, prompt_tokens: int, max_model_len: int, settings: Settings) -> int:
    """How many tokens the answer may have: asked for (within MAX_TOKENS_LIMIT), else the default, and
    always within the context left after the prompt."""
    room = max_model_len - prompt_tokens
    if requested is not None and requested > settings.max_tokens_limit:
        raise InvalidRequestError(
            f"max_tokens is {requested}, above this server's limit of {settings.max_tokens_limit}.",
            param="max_tokens",
            code="max_tokens_too_large",
        )
    if requested is not None and requested > room or room < 1:
        asked = requested if requested is not None else 1
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + asked} tokens ({prompt_tokens} in the messages, {asked} in the completion). "
            "Please reduce the length of the messages or completion.",
            param="messages",
            code="context_length_exceeded",
        )
    return requested if requested is not None else min(settings.default_max_tokens, room)


def resolve_sampling(
    request: GenerationOptions, defaults: GenerationDefaults, max_new_tokens: int, choice_index: int = 0
) -> SamplingParams:
    """Sampling for one choice: the request's values, else the checkpoint's generation config, else OpenAI's
    defaults. Choice i of a seeded request uses seed + i, so the n answers differ yet are reproducible."""

    def pick(value, default, fallback):
        return value if value is not None else default if default is not None else fallback

    top_k = pick(request.top_k, defaults.top_k, 0)
    seed = request.seed + choice_index if request.seed is not None else None
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=float(pick(request.temperature, defaults.temperature, 1.0)),
        top_p=float(pick(request.top_p, defaults.top_p, 1.0)),
        top_k=max(int(top_k), 0),
        min_p=float(request.min_p or 0.0),
        repetition_penalty=float(pick(request.repetition_penalty, defaults.repetition_penalty, 1.0)),
        presence_penalty=float(request.presence_penalty or 0.0),
        frequency_penalty=float(request.frequency_penalty or 0.0),
        stop=request.stop_strings,
        seed=seed,
        ignore_eos=request.ignore_eos,
    )


@dataclass
class PreparedChat:
    """A request turned into model inputs and one SamplingParams per choice."""

    request_id: str
    created: int
    inputs: PreparedPrompt
    choices: list[SamplingParams]
    images: list[DecodedImage]
    preprocessing_seconds: float


class ChatCompletionHandler:
    """Serves `/v1/chat/completions` on top of the engine."""

    def __init__(self, engine: EngineClient, settings: Settings, intake: ImageIntake) -> None:
        self._engine = engine
        self._settings = settings
        self._intake = intake

    async def prepare(self, request: ChatCompletionRequest) -> PreparedChat:
        """Validate against the model, load images, tokenise, and fix each choice's sampling."""
        check_model_name(request.model, self._settings)
        request.check_supported(self._settings.max_n)
        if len(request.messages) > self._settings.max_messages:
            raise InvalidRequestError(
                f"The request has {len(request.messages)} messages; at most {self._settings.max_messages} are "
                "allowed (MAX_MESSAGES).",
                param="messages",
                code="too_many_messages",
            )
        self._engine.require_ready()  # a 503 now, before any image is fetched or decoded
        started = time.perf_counter()
        images = await self._intake.load(collect_images(request.messages))
        return await self.prepare_turns(
            request, messages_to_turns(request.messages, images), images, started, "chatcmpl"
        )

    async def prepare_turns(
        self,
        request: GenerationOptions,
        turns: list[ChatTurn],
        images: list[DecodedImage],
        started: float,
        id_prefix: str,
    ) -> PreparedChat:
        """Tokenise a conversation (images resized within the request's bounds) and fix the sampling."""
        model = self._engine.require_ready()
        bounds = PixelBounds(self._settings.min_pixels, self._settings.max_pixels).narrowed(
            request.min_pixels, request.max_pixels
        )
        inputs = await self._engine.prepare(turns, bounds)
        max_new = resolve_max_new_tokens(
            request.requested_max_tokens, inputs.prompt_tokens, model.max_model_len, self._settings
        )
        choices = [resolve_sampling(request, model.generation_defaults, max_new, index) for index in range(request.n)]
        return PreparedChat(
            request_id=f"{id_prefix}-{uuid.uuid4().hex}",
            created=int(time.time()),
            inputs=inputs,
            choices=choices,
            images=images,
            preprocessing_seconds=time.perf_counter() - started,
        )

    def start(self, prepared: PreparedChat) -> list[GenerationStream]:
        """Queue one generation per choice, all or none (a 429 or 503 leaves nothing running)."""
        choices = [(f"{prepared.request_id}-{index}", params) for index, params in enumerate(prepared.choices)]
        return self._engine.generate_many(choices, prepared.inputs)

    async def generate_all(self, prepared: PreparedChat, log: dict | None = None) -> list[GenerationResult]:
        """Generate every choice to the end (logged); a failure or cancellation stops them all."""
        results = await collect_all(self.start(prepared))
        self._log(prepared, [result.finish for result in results], log)
        return results

    async def complete(self, prepared: PreparedChat, log: dict | None = None) -> ChatCompletionResponse:
        """Generate every choice and answer with the whole message(s)."""
        results = await self.generate_all(prepared, log)
        return ChatCompletionResponse(
            id=prepared.request_id,
            created=prepared.created,
            model=self._settings.model_name,
            choices=[
                Choice(
                    index=index,
                    message=AssistantMessage(content=result.text),
                    finish_reason=_api_finish_reason(result.finish),
                )
                for index, result in enumerate(results)
            ],
            usage=Usage.of(prepared.inputs.prompt_tokens, sum(r.finish.completion_tokens for r in results)),
        )

    async def stream(
        self,
        prepared: PreparedChat,
        streams: list[GenerationStream],
        include_usage: bool,
        suffix: str = "",
        log: dict | None = None,
    ) -> AsyncIterator[str]:
        """The answer as SSE: per choice a role chunk, content chunks (then `suffix`, if any), a chunk with
        `finish_reason`; then the usage chunk if asked for, and `[DONE]`. Keep-alives fill quiet intervals.

        `streams` were started (`start`) before the response began, so a full queue is a real 429."""
        keepalive = self._settings.stream_keepalive_seconds
        finishes: list[Finished] = []
        content = ContentChunks(prepared.request_id, prepared.created, self._settings.model_name)
        pieces: list[str] = []  # content chunks already here: they go out in one write
        try:
            for index, stream in enumerate(streams):
                yield self._chunk(prepared, ChunkChoice(index=index, delta=ChunkDelta(role="assistant", content="")))
                async for event in stream.events(keepalive):
                    if event is KEEPALIVE:
                        yield KEEPALIVE_COMMENT
                        continue
                    if event.text:
                        pieces.append(content.chunk(index, event.text))
                    if pieces and stream.drained:
                        yield "".join(pieces)
                        pieces = []
                if pieces:
                    yield "".join(pieces)
                    pieces = []
                if suffix:
                    yield self._chunk(prepared, ChunkChoice(index=index, delta=ChunkDelta(content=suffix)))
                finishes.append(stream.finished)
                reason = _api_finish_reason(stream.finished)
                yield self._chunk(prepared, ChunkChoice(index=index, delta=ChunkDelta(), finish_reason=reason))
            if include_usage:
                completion_tokens = sum(finish.completion_tokens for finish in finishes)
                usage = Usage.of(prepared.inputs.prompt_tokens, completion_tokens)
                yield self._chunk(prepared, usage=usage)
            self._log(prepared, finishes, log)
        except Exception as exc:  # after the first byte, errors can only travel as an event
            if log is not None:
                log["error"] = getattr(exc, "code", None) or type(exc).__name__
            if pieces:  # text generated before the failure arrived with it in one batch: deliver it first
                yield "".join(pieces)
            yield error_event(exc)
        except BaseException:  # cancelled: the client went away
            if log is not None:
                log["client_disconnected"] = True
            raise
        finally:
            for stream in streams:  # the client left, or a choice failed: stop whatever still runs
                stream.cancel()
        yield DONE_EVENT

    def _chunk(self, prepared: PreparedChat, choice: ChunkChoice | None = None, usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(
            id=prepared.request_id,
            created=prepared.created,
            model=self._settings.model_name,
            choices=[choice] if choice is not None else [],
            usage=usage,
        )
        return sse_event(chunk.model_dump(exclude_none=True))

    @staticmethod
    def _log(prepared: PreparedChat, finishes: list[Finished], log: dict | None) -> None:
        """Add the answer's figures to the request's log line (times in ms; time to first token counted from
        when the request was queued)."""
        if log is None or not finishes:
            return
        first = finishes[0]
        ttft = first.queue_seconds + first.time_to_first_token if first.time_to_first_token is not None else None
        log.update(
            {
                "completion_id": prepared.request_id,
                "prompt_tokens": prepared.inputs.prompt_tokens,
                "completion_tokens": sum(finish.completion_tokens for finish in finishes),
                "images": len(prepared.inputs.image_token_counts),
                "finish_reason": ",".join(finish.finish_reason for finish in finishes),
                "queue_ms": round(first.queue_seconds * 1000, 1),
                "ttft_ms": round(ttft * 1000, 1) if ttft is not None else None,
                "generation_ms": round(max(finish.generation_seconds for finish in finishes) * 1000, 1),
            }
        )


class ContentChunks:
    """Content chunks, the bulk of a stream, written from a template: the same JSON as the pydantic model
    (`ChatCompletionChunk` with one choice and a content delta) at a fraction of the cost per token."""

    def __init__(self, request_id: str, created: int, model: str) -> None:
        head = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}
        self._prefix = (
            "data: " + json.dumps(head, ensure_ascii=False, separators=(",", ":"))[:-1] + ',"choices":[{"index":'
        )

    def chunk(self, index: int, text: str) -> str:
        """One `data:` event with `text` as choice `index`'s content delta."""
        return f'{self._prefix}{index},"delta":{{"content":{json.dumps(text, ensure_ascii=False)}}}}}]}}\n\n'


def _api_finish_reason(finish: Finished) -> str:
    """`length` when max_tokens cut the answer; `stop` for an end token or a stop string."""
    return "length" if finish.finish_reason == "length" else "stop"
