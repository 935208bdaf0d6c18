"""`FakeEngine`: an engine without a model, for tests of the HTTP side's own logic in milliseconds.

It answers every generation with a scripted text, one character per token, on the event loop; it keeps a
bounded queue like a real engine (`max_queue` gives 429), honours cancellation (`abort`), can be made to load
slowly or to fail loading, and counts what it did. The handlers cannot tell it from a real engine: that is
the point of the interface. End-to-end tests keep using the real tiny checkpoints.
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
    """Answers `reply(prompt_text)` for every generation, a character per token."""

    name = "fake"

    def __init__(
        self,
        reply: Callable[[str], str] = lambda text: f"答：{text[-20:]}",
        *,
        max_model_len: int = 4096,
        accepts_images: bool = True,
        max_queue: int = 64,
        seconds_per_token: float = 0.0,
        load_seconds: float = 0.0,
        load_error: str | None = None,
    ) -> None:
        super().__init__()
        self._reply = reply
        self._model = ServedModel(max_model_len=max_model_len, accepts_images=accepts_images)
        self._max_queue = max_queue
        self._seconds_per_token = seconds_per_token
        self._load_seconds = load_seconds
        self._load_error = load_error
        self._loaded = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
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
        """Abort every generation still running."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def model(self) -> ServedModel | None:
        """The fake model's facts once 'loaded'."""
        return self._model if self.state == "ready" else None

    def unavailable(self) -> ModelNotReadyError:
        """Loading, or the scripted load error."""
        if self.state == "loading":
            return ModelNotReadyError("The model is still loading; retry in a moment.", code="model_loading")
        return ModelNotReadyError(f"The model failed to load: {self.error}", code="model_load_failed")

    async def prepare(self, turns: list[ChatTurn], bounds: PixelBounds | None = None) -> FakePrompt:
        """The turns' texts joined; images counted with the real resize rule."""
        self.require_ready()
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

    def generate_many(self, choices: list[tuple[str, SamplingParams]], prompt: FakePrompt) -> list[GenerationStream]:
        """Start one scripted answer per choice, all or none within `max_queue`."""
        self.require_ready()
        if len(self._tasks) + len(choices) > self._max_queue:
            raise QueueFullError(self._max_queue, retry_after_seconds=1)
        streams = []
        for _, params in choices:
            queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
            task = asyncio.create_task(self._answer(prompt, params, queue))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            streams.append(GenerationStream(queue, task.cancel))
        return streams

    async def _answer(self, prompt: FakePrompt, params: SamplingParams, queue: asyncio.Queue) -> None:
        """Stream the scripted reply (cut at max_tokens), then Finished; a cancel ends it with `abort`."""
        started = time.perf_counter()
        produced, reason = 0, "stop"
        try:
            for character in self._reply(prompt.text):
                if produced >= params.max_new_tokens:
                    reason = "length"
                    break
                await asyncio.sleep(self._seconds_per_token)
                produced += 1
                queue.put_nowait(TextDelta(character, produced))
        except asyncio.CancelledError:
            reason = "abort"
        except Exception as exc:  # a scripted reply that raises: the request fails, as a broken model would
            self._finish(queue, Failed(exc))
            return
        elapsed = time.perf_counter() - started
        self._finish(queue, Finished(reason, prompt.prompt_tokens, produced, 0.0, 0.0 if produced else None, elapsed))

    def _finish(self, queue: asyncio.Queue, event: GenerationEvent) -> None:
        """Count the final event and hand it to the stream."""
        self._notify(event)
        queue.put_nowait(event)

    def queue_sizes(self) -> tuple[int, int]:
        """Every scripted answer runs at once: (running, 0)."""
        return len(self._tasks), 0

    def memory(self) -> dict[str, Any]:
        """No GPU, no model: nothing worth measuring."""
        return {"process_rss_bytes": 0, "gpus": []}

    def report(self) -> EngineReport:
        """A fake's report: its name and counters."""
        running, waiting = self.queue_sizes()
        return EngineReport(self.name, {}, {"running": running, "waiting": waiting}, self.stats, self.memory())
