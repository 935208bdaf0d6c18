"""`FakeEngine`: an engine without a model, for tests of the HTTP side's own logic in milliseconds.

It answers every generation with a scripted text, one character per token, on the event loop; it bounds
how many run at once (429 beyond), honours cancellation (`abort`), stop strings and shutdown, can be made to
load slowly or to fail loading, and counts what it did: enough for the handlers' own logic, which only
speaks to the interface. End-to-end tests keep using the real tiny checkpoints.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from backend.engines.client import EngineClient, EngineReport, ServedModel
from backend.engines.events import Failed, Finished, GenerationEvent, GenerationStream, TextDelta
from backend.engines.requests import ChatTurn, SamplingParams
from backend.errors import ModelNotReadyError, QueueFullError
from backend.media.resize import PixelBounds, image_token_count, smart_resize


@dataclass
class FakePrompt:
    """The conversation's text, with a token count of one per character (and the images' real counts)."""

    text: str
    image_token_counts: list[int] = field(default_factory=list)
    resized_image_sizes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        """One token per character of text, plus each image's tokens."""
        return len(self.text) + sum(self.image_token_counts)


class FakeEngine(EngineClient):
    """Answers `reply(prompt_text)` for every generation, a character per token.

    What it honours: `max_new_tokens` (finish `length`), stop strings (cut, finish `stop`), `ignore_eos` (the
    reply repeats up to `max_new_tokens`), cancellation (finish `abort`), shutdown (later requests get 503),
    and at most `max_running` generations at once (beyond: 429). What it does not: sampling (the reply is
    the reply), seeds, and deadlines (REQUEST_TIMEOUT belongs to the real engines).
    """

    name = "fake"

    def __init__(
        self,
        reply: Callable[[str], str] = lambda text: f"答：{text[-20:]}",
        *,
        max_model_len: int = 4096,
        accepts_images: bool = True,
        max_running: int = 64,
        seconds_per_token: float = 0.0,
        load_seconds: float = 0.0,
        load_error: str | None = None,
    ) -> None:
        super().__init__("tiny")
        self._reply = reply
        self._model = ServedModel(max_model_len=max_model_len, accepts_images=accepts_images)
        self._max_running = max_running
        self._running = 0
        self._stopping = False
        self._seconds_per_token = seconds_per_token
        self._load_seconds = load_seconds
        self._load_error = load_error
        self._loaded = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._cancels: set[asyncio.Event] = set()
        self.prompts: list[FakePrompt] = []  # every prepared prompt, for assertions

    async def start(self) -> None:
        """'Load' in the background: after `load_seconds`, ready or failed."""

        async def load() -> None:
            await asyncio.sleep(self._load_seconds)
            self.state, self.error = ("error", self._load_error) if self._load_error else ("ready", None)
            self._loaded.set()

        self._load_task = asyncio.create_task(load())

    async def wait_until_loaded(self) -> None:
        """Return when the 'load' has ended."""
        await self._loaded.wait()

    async def shutdown(self) -> None:
        """Refuse new work, abort what runs (each ends with `abort`), and wait for it."""
        self._stopping = True
        for cancel in list(self._cancels):
            cancel.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def model(self) -> ServedModel | None:
        """The fake model's facts once 'loaded'."""
        return self._model if self._state == "ready" else None

    async def prepare(self, turns: list[ChatTurn], bounds: PixelBounds | None = None) -> FakePrompt:
        """The turns' texts joined; images counted with the real resize rule."""
        self.require_loaded()
        bounds = bounds or PixelBounds(56 * 56, 360 * 420)
        texts, counts, sizes = [], [], []
        for turn in turns:
            for part in turn.parts:
                if isinstance(part, str):
                    texts.append(part)
                else:
                    width, height = smart_resize(part.width, part.height, bounds)
                    counts.append(image_token_count(width, height))
                    sizes.append((width, height))
        prompt = FakePrompt("\n".join(texts), counts, sizes)
        self.prompts.append(prompt)
        return prompt

    async def prepare_raw(self, prompt: str | list[int]) -> FakePrompt:
        """The prompt's text (ids are shown as characters: one token each)."""
        self.require_loaded()
        text = prompt if isinstance(prompt, str) else self.decode(prompt)
        self.prompts.append(FakePrompt(text))
        return self.prompts[-1]

    def decode(self, token_ids: list[int]) -> str:
        """One character per id."""
        return "".join(chr(token) for token in token_ids)

    def generate_many(self, choices: list[tuple[str, SamplingParams]], prompt: FakePrompt) -> list[GenerationStream]:
        """Start one scripted answer per choice, all or none within `max_running`."""
        self.require_loaded()
        if self._stopping:
            raise ModelNotReadyError("The server is shutting down.", code="shutting_down")
        if self._running + len(choices) > self._max_running:
            raise QueueFullError(self._max_running, retry_after_seconds=1)
        streams = []
        for _, params in choices:
            queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
            cancel = asyncio.Event()
            self._running += 1
            self._cancels.add(cancel)
            task = asyncio.create_task(self._answer(prompt, params, queue, cancel))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            streams.append(GenerationStream(queue, cancel.set))
        return streams

    async def _answer(
        self, prompt: FakePrompt, params: SamplingParams, queue: asyncio.Queue, cancel: asyncio.Event
    ) -> None:
        """Stream the scripted reply, then exactly one final event, whatever happens."""
        started = time.perf_counter()
        produced = 0
        final: GenerationEvent | None = None
        try:
            text, reason = self._scripted(prompt, params)
            for character in text:
                if cancel.is_set():
                    reason = "abort"
                    break
                await asyncio.sleep(self._seconds_per_token)
                produced += 1
                queue.put_nowait(TextDelta(character, produced))
            if cancel.is_set():
                reason = "abort"
            elapsed = time.perf_counter() - started
            final = Finished(reason, prompt.prompt_tokens, produced, 0.0, 0.0 if produced else None, elapsed)
        except Exception as exc:  # a scripted reply that raises: the request fails, as a broken model would
            final = Failed(exc)
        finally:
            self._running -= 1  # before the client can see the end, so it may send the next request at once
            self._cancels.discard(cancel)
            final = final or Finished("abort", prompt.prompt_tokens, produced, 0.0, None, 0.0)
            self._notify(final)
            queue.put_nowait(final)

    def _scripted(self, prompt: FakePrompt, params: SamplingParams) -> tuple[str, str]:
        """The text to stream and its finish reason, as a real engine would end it."""
        text = self._reply(prompt.text)
        if params.ignore_eos and text:
            text = text * (params.max_new_tokens // len(text) + 1)
        for stop in params.stop:
            if stop in text:
                return text[: text.index(stop)][: params.max_new_tokens], "stop"
        if len(text) >= params.max_new_tokens:  # the end token would have been one more: `length`
            return text[: params.max_new_tokens], "length"
        return text, "stop"

    def queue_sizes(self) -> tuple[int, int]:
        """Every scripted answer runs at once: (running, 0)."""
        return self._running, 0

    def memory(self) -> dict[str, Any]:
        """No GPU, no model: nothing worth measuring."""
        return {"process_rss_bytes": 0, "gpus": []}

    def report(self) -> EngineReport:
        """A fake's report: its name and counters."""
        running, waiting = self.queue_sizes()
        return EngineReport(self.name, {}, {"running": running, "waiting": waiting}, self.stats, self.memory())
