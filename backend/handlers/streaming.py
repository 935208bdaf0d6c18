"""Server-Sent Events and client-disconnect handling, shared by every route that streams or generates.

SSE framing follows OpenAI: one `data: <json>` event per chunk, `: keep-alive` comments while waiting (so a
proxy such as RunPod's, which cuts a request after 100 s without a byte, keeps the connection), an error event
if something breaks after the stream started, and `data: [DONE]` always last.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, Protocol, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from backend.engines.events import GenerationResult, GenerationStream
from backend.errors import APIError, ClientDisconnected

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Cancellable(Protocol):
    """Something running that can be told to stop (a generation stream)."""

    def cancel(self) -> None: ...

KEEPALIVE_COMMENT = ": keep-alive\n\n"
DONE_EVENT = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: Any) -> str:
    """One `data:` event; Chinese stays as UTF-8 rather than \\u escapes."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def error_event(exc: BaseException) -> str:
    """The event that reports a failure after the stream started. Unexpected errors are logged, not leaked."""
    if isinstance(exc, APIError):
        return sse_event({"error": exc.to_dict()})
    logger.error("error inside a stream", exc_info=exc)
    return sse_event(
        {"error": {"message": "Internal server error.", "type": "server_error", "param": None, "code": None}}
    )


class EventStreamResponse(StreamingResponse):
    """An SSE response that cancels its generations however it ends: finished, failed, or the client gone.

    The generations behind a stream are started before the response (so a full queue is a real 429); if
    the client leaves before the first chunk, the event generator never runs its own clean-up, so this is
    where they are stopped.
    """

    def __init__(self, events: AsyncIterator[str], cancel: Sequence[Cancellable] = ()) -> None:
        super().__init__(events, media_type="text/event-stream; charset=utf-8", headers=SSE_HEADERS)
        self._cancel = list(cancel)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for generation in self._cancel:
                generation.cancel()


def sse_response(events: AsyncIterator[str], cancel: Sequence[Cancellable] = ()) -> StreamingResponse:
    """A streaming response of SSE text; `cancel` lists the generations to stop when it ends, whatever the
    reason. Starlette cancels `events` when the client disconnects."""
    return EventStreamResponse(events, cancel)


async def _wait_for_disconnect(request: Request) -> None:
    """Return once the client has closed the connection (the body was already read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect_all(streams: Sequence[GenerationStream]) -> list[GenerationResult]:
    """Every stream's whole answer, in order; one failing (or the caller cancelled) stops all the others."""
    tasks = [asyncio.ensure_future(stream.collect()) for stream in streams]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:  # one choice failed or the client left: stop the others too
            task.cancel()
        for stream in streams:  # a task cancelled before it ran never reached its own clean-up
            stream.cancel()
        raise


def request_log(request: Request) -> dict:
    """The fields of this request's log line (written by the request-context middleware at the end)."""
    return request.scope.setdefault("state", {}).setdefault("log", {})


async def unless_disconnected(request: Request, work: Awaitable[T], log: dict | None = None) -> T:
    """Await `work`, but cancel it if the client disconnects first (then raise ClientDisconnected).

    Cancelling the work cancels its generation streams, so an abandoned non-streaming request stops at its
    next decode step instead of running to max_tokens.
    """
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work_task.done():
            work_task.cancel()
        watcher.cancel()
        # A cancelled task is only done once it has run its clean-up: wait for that (whatever it ends with),
        # or reading its result below would find it still pending.
        await asyncio.wait({work_task})
    if work_task.cancelled():
        if log is not None:
            log["client_disconnected"] = True
        raise ClientDisconnected()
    return work_task.result()
