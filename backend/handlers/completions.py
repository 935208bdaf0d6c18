"""The legacy completion handler (`/v1/completions`): raw prompts in, text completions out, streamed or not.

Each prompt is tokenised by the engine as its client wrote it (`prepare_raw`), gets `n` generations with the
chat endpoint's sampling rules, and all of a request's generations are queued all or none.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from backend.engines import EngineClient
from backend.engines.events import KEEPALIVE, GenerationStream
from backend.engines.requests import PreparedPrompt, SamplingParams
from backend.handlers.chat import check_model_name, resolve_max_new_tokens, resolve_sampling
from backend.handlers.streaming import DONE_EVENT, KEEPALIVE_COMMENT, collect_all, error_event, sse_event
from backend.protocol.common import Usage
from backend.protocol.completions import DEFAULT_MAX_TOKENS, CompletionChoice, CompletionRequest, CompletionResponse
from backend.settings import Settings


@dataclass
class PreparedCompletion:
    """Each prompt's input, the text an echo repeats, and the sampling of each of its `n` choices."""

    request_id: str
    created: int
    prompts: list[PreparedPrompt]
    echoes: list[str]
    choices: list[list[SamplingParams]]  # per prompt, per choice

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens of the whole request (every prompt once, as OpenAI counts them)."""
        return sum(prompt.prompt_tokens for prompt in self.prompts)


class CompletionHandler:
    """Serves `/v1/completions` on top of the engine."""

    def __init__(self, engine: EngineClient, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings

    async def prepare(self, request: CompletionRequest) -> PreparedCompletion:
        """Validate, tokenise every prompt, and fix each choice's sampling."""
        check_model_name(request.model, self._settings)
        request.check_supported(self._settings.max_n)
        model = self._engine.require_ready()
        requested = request.requested_max_tokens
        prompts, echoes, choices = [], [], []
        for prompt in request.prompts:
            prepared = await self._engine.prepare_raw(prompt)
            room = model.max_model_len - prepared.prompt_tokens
            # OpenAI's default here is 16 tokens, not the chat endpoint's DEFAULT_MAX_TOKENS.
            wanted = requested if requested is not None else min(DEFAULT_MAX_TOKENS, room)
            max_new = resolve_max_new_tokens(wanted, prepared.prompt_tokens, model.max_model_len, self._settings)
            prompts.append(prepared)
            echoes.append((prompt if isinstance(prompt, str) else self._engine.decode(prompt)) if request.echo else "")
            choices.append([resolve_sampling(request, model.generation_defaults, max_new, i) for i in range(request.n)])
        return PreparedCompletion(f"cmpl-{uuid.uuid4().hex}", int(time.time()), prompts, echoes, choices)

    def start(self, prepared: PreparedCompletion) -> list[GenerationStream]:
        """Queue every generation of the request, all or none (a 429 or 503 leaves nothing running)."""
        streams: list[GenerationStream] = []
        try:
            for index, (prompt, samplings) in enumerate(zip(prepared.prompts, prepared.choices)):
                requests = [(f"{prepared.request_id}-{index}-{i}", params) for i, params in enumerate(samplings)]
                streams += self._engine.generate_many(requests, prompt)
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        return streams

    def _echo(self, prepared: PreparedCompletion, index: int) -> str:
        return prepared.echoes[index // len(prepared.choices[0])]

    async def complete(self, prepared: PreparedCompletion) -> CompletionResponse:
        """Every completion, whole."""
        results = await collect_all(self.start(prepared))
        return CompletionResponse(
            id=prepared.request_id,
            created=prepared.created,
            model=self._settings.model_name,
            choices=[
                CompletionChoice(
                    index=index,
                    text=self._echo(prepared, index) + result.text,
                    finish_reason="length" if result.finish.finish_reason == "length" else "stop",
                )
                for index, result in enumerate(results)
            ],
            usage=Usage.of(prepared.prompt_tokens, sum(result.finish.completion_tokens for result in results)),
        )

    async def stream(
        self, prepared: PreparedCompletion, streams: list[GenerationStream], include_usage: bool
    ) -> AsyncIterator[str]:
        """SSE chunks: per completion its echo (if asked), its text pieces, a chunk with `finish_reason`; then
        the usage chunk if asked for, and `[DONE]`. The streams were started before the response began."""
        completion_tokens = 0
        try:
            for index, stream in enumerate(streams):
                if echo := self._echo(prepared, index):
                    yield self._chunk(prepared, CompletionChoice(index=index, text=echo))
                async for event in stream.events(self._settings.stream_keepalive_seconds):
                    if event is KEEPALIVE:
                        yield KEEPALIVE_COMMENT
                    elif event.text:
                        yield self._chunk(prepared, CompletionChoice(index=index, text=event.text))
                assert stream.finished is not None
                completion_tokens += stream.finished.completion_tokens
                reason = "length" if stream.finished.finish_reason == "length" else "stop"
                yield self._chunk(prepared, CompletionChoice(index=index, text="", finish_reason=reason))
            if include_usage:
                yield self._chunk(prepared, usage=Usage.of(prepared.prompt_tokens, completion_tokens))
        except Exception as exc:  # after the first byte, errors can only travel as an event
            yield error_event(exc)
        finally:
            for stream in streams:
                stream.cancel()
        yield DONE_EVENT

    def _chunk(
        self, prepared: PreparedCompletion, choice: CompletionChoice | None = None, usage: Usage | None = None
    ) -> str:
        chunk = CompletionResponse(
            id=prepared.request_id,
            created=prepared.created,
            model=self._settings.model_name,
            choices=[choice] if choice is not None else [],
            usage=usage,
        )
        return sse_event(chunk.model_dump(exclude_none=True))
