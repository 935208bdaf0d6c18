"""The chat completion handler: from a validated request to generation jobs and back to an OpenAI answer."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from anyio import to_thread

from backend.engine.engine import Engine, GenerationResult
from backend.engine.loader import GenerationDefaults
from backend.engine.prompt import ChatTurn, ModelInputs
from backend.engine.sampling import SamplingParams
from backend.errors import InvalidRequestError, ModelNotFoundError
from backend.media import load_image_url
from backend.protocol.chat import AssistantMessage, ChatCompletionRequest, ChatCompletionResponse, ChatMessage, Choice
from backend.protocol.common import Usage
from backend.settings import Settings

logger = logging.getLogger(__name__)


def check_model_name(requested: str | None, settings: Settings) -> None:
    """Accept no name, the served name, or MODEL_ID; anything else is a 404 `model_not_found`."""
    if requested and requested not in (settings.model_name, settings.model_id):
        raise ModelNotFoundError(requested, settings.model_name)


def messages_to_turns(messages: list[ChatMessage]) -> list[ChatTurn]:
    """OpenAI messages -> engine turns, decoding every image (CPU work: call it off the event loop)."""
    turns = []
    for index, message in enumerate(messages):
        source = f"messages[{index}]"
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str) or message.content is None:
            turns.append(ChatTurn(role, [message.content or ""], source=source))
            continue
        parts: list = []
        image_sources: list[str] = []
        for part_index, part in enumerate(message.content):
            if part.type == "text":
                parts.append(part.text)
                continue
            image_source = f"{source}.content[{part_index}]"
            if role != "user":
                raise InvalidRequestError(
                    f"Images are only allowed in user messages; {image_source} is in a {message.role} message.",
                    param=image_source,
                )
            parts.append(load_image_url(part.image_url.url, image_source))
            image_sources.append(image_source)
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
    request: ChatCompletionRequest, defaults: GenerationDefaults, max_new_tokens: int, choice_index: int = 0
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
    )


@dataclass
class PreparedChat:
    """A request turned into model inputs and one SamplingParams per choice."""

    request_id: str
    created: int
    inputs: ModelInputs
    choices: list[SamplingParams]


class ChatCompletionHandler:
    """Serves `/v1/chat/completions` on top of the engine."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings

    async def prepare(self, request: ChatCompletionRequest) -> PreparedChat:
        """Validate against the model, decode images, tokenise, and fix each choice's sampling."""
        check_model_name(request.model, self._settings)
        request.check_supported(self._settings.max_n)
        loaded = self._engine.require_ready()
        turns = await to_thread.run_sync(messages_to_turns, request.messages)
        inputs = await self._engine.build_inputs(turns)
        max_new = resolve_max_new_tokens(
            request.requested_max_tokens, inputs.prompt_tokens, loaded.max_model_len, self._settings
        )
        choices = [
            resolve_sampling(request, loaded.generation_defaults, max_new, index) for index in range(request.n)
        ]
        return PreparedChat(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), inputs, choices)

    async def complete(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        """Generate every choice and answer with the whole message(s)."""
        prepared = await self.prepare(request)
        streams = [
            self._engine.generate(f"{prepared.request_id}-{index}", prepared.inputs, params)
            for index, params in enumerate(prepared.choices)
        ]
        tasks = [asyncio.ensure_future(stream.collect()) for stream in streams]
        try:
            results: list[GenerationResult] = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one choice failed or the client left: stop the others too
                task.cancel()
            raise
        completion_tokens = sum(result.finish.completion_tokens for result in results)
        self._log(prepared, results)
        return ChatCompletionResponse(
            id=prepared.request_id,
            created=prepared.created,
            model=self._settings.model_name,
            choices=[
                Choice(
                    index=index,
                    message=AssistantMessage(content=result.text),
                    finish_reason="length" if result.finish.finish_reason == "length" else "stop",
                )
                for index, result in enumerate(results)
            ],
            usage=Usage.of(prepared.inputs.prompt_tokens, completion_tokens),
        )

    @staticmethod
    def _log(prepared: PreparedChat, results: list[GenerationResult]) -> None:
        for index, result in enumerate(results):
            finish = result.finish
            ttft = f"{finish.time_to_first_token * 1000:.0f}" if finish.time_to_first_token is not None else "-"
            logger.info(
                "request %s choice %d: %d prompt + %d completion tokens, %d images, finish=%s, "
                "queue %.0f ms, ttft %s ms, generation %.0f ms",
                prepared.request_id,
                index,
                finish.prompt_tokens,
                finish.completion_tokens,
                len(prepared.inputs.image_token_counts),
                finish.finish_reason,
                finish.queue_seconds * 1000,
                ttft,
                finish.generation_seconds * 1000,
            )
