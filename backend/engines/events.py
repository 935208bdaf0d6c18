"""What every engine hands back: generation events, the stream a handler reads them from, and counters.

An engine produces, for each generation, `TextDelta` events and then one `Finished` or `Failed`; they reach
the event loop through an `EventRelay` (many per wake-up) and are read from a `GenerationStream`. Nothing
here knows which engine runs or imports torch.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TextDelta:
    """New answer text (may be empty when a token only completed part of a character)."""

    text: str
    completion_tokens: int


@dataclass(frozen=True)
class Finished:
    """The answer is complete. Timings are in seconds."""

    finish_reason: str  # "stop", "length" or "abort"
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float
    time_to_first_token: float | None  # from the start of the work, not counting the queue
    generation_seconds: float


@dataclass(frozen=True)
class Failed:
    """The generation broke; `error` is raised to whoever reads the stream."""

    error: Exception


GenerationEvent = TextDelta | Finished | Failed


@dataclass(frozen=True)
class GenerationResult:
    """A whole answer, for non-streaming responses."""

    text: str
    finish: Finished


class EventRelay:
    """Carries events from the inference thread to the event loop, many per wake-up.

    A decode step of a 32-sequence batch makes 32 events; waking the loop once per event would make the
    loop compete with the model for the CPU. Events wait in a list until the one scheduled flush runs.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, GenerationEvent]] = []
        self._scheduled = False

    def put(self, queue: asyncio.Queue, event: GenerationEvent) -> None:
        """Called on the engine's thread (or the event loop itself)."""
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for queue, event in pending:
            queue.put_nowait(event)


class KeepAlive:
    """Yielded by `GenerationStream.events` when nothing happened for a keep-alive interval."""


KEEPALIVE = KeepAlive()


class GenerationStream:
    """The events of one generation, read on the event loop; `cancel()` stops it at the next step."""

    def __init__(self, queue: asyncio.Queue[GenerationEvent], cancel: Callable[[], None]) -> None:
        self._queue = queue
        self._cancel = cancel
        self.finished: Finished | None = None

    @property
    def drained(self) -> bool:
        """No event is waiting to be read right now (a good moment to flush what was read)."""
        return self._queue.empty()

    def cancel(self) -> None:
        """Ask the engine to stop this generation (before it starts, or at the next token); idempotent."""
        self._cancel()

    async def events(self, keepalive_seconds: float | None = None) -> AsyncIterator[TextDelta | KeepAlive]:
        """Yield text deltas until the end (then `finished` is set); a failure is raised here.

        With `keepalive_seconds`, KEEPALIVE is yielded whenever that long passes without an event (the
        request waits in the queue, or a long prefill runs). Leaving the loop early cancels the generation.
        """
        try:
            while self.finished is None:
                try:
                    # Cancelling a Queue.get loses no item, so waiting with a timeout is safe.
                    event = await asyncio.wait_for(self._queue.get(), keepalive_seconds)
                except TimeoutError:
                    yield KEEPALIVE
                    continue
                if isinstance(event, Failed):
                    raise event.error
                if isinstance(event, Finished):
                    self.finished = event
                else:
                    yield event
        finally:
            if self.finished is None:
                self.cancel()

    async def collect(self) -> GenerationResult:
        """Wait for the whole answer."""
        pieces = [event.text async for event in self.events() if isinstance(event, TextDelta)]
        assert self.finished is not None
        return GenerationResult("".join(pieces), self.finished)


@dataclass
class EngineStats:
    """Counters of finished generations, by finish reason (the proof that aborted ones really stopped)."""

    finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})
    failed: int = 0
    generated_tokens: int = 0
    last_aborted_tokens: int | None = None  # tokens the most recently aborted generation had produced

    def record(self, event: GenerationEvent) -> None:
        """Count a final event (called on the inference thread; readers only read)."""
        if isinstance(event, Failed):
            self.failed += 1
        elif isinstance(event, Finished):
            self.finished[event.finish_reason] = self.finished.get(event.finish_reason, 0) + 1
            self.generated_tokens += event.completion_tokens
            if event.finish_reason == "abort":
                self.last_aborted_tokens = event.completion_tokens


