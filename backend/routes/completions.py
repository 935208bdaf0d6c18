"""`POST /v1/completions`: OpenAI's legacy text completions (LiteLLM's `text_completion`, evaluation harnesses)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from backend.handlers.completions import CompletionHandler
from backend.handlers.streaming import request_log, sse_response, unless_disconnected
from backend.protocol.common import ErrorResponse
from backend.protocol.completions import CompletionRequest, CompletionResponse

router = APIRouter(tags=["completions"])


def get_completion_handler(request: Request) -> CompletionHandler:
    """The legacy completion handler."""
    return request.app.state.completion_handler


CompletionHandlerDep = Annotated[CompletionHandler, Depends(get_completion_handler)]


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={200: {"content": {"text/event-stream": {}}}, 400: {"model": ErrorResponse}},
)
async def create_completion(
    body: CompletionRequest, request: Request, handler: CompletionHandlerDep
) -> CompletionResponse | StreamingResponse | Response:
    """Continue a raw prompt (text or token ids); `stream: true` answers with SSE."""
    log = request_log(request)
    prepared = await unless_disconnected(request, handler.prepare(body), log)
    if body.stream:
        streams = handler.start(prepared)  # before the headers: a full queue is a 429, not a broken stream
        return sse_response(handler.stream(prepared, streams, body.include_usage), cancel=streams)
    return await unless_disconnected(request, handler.complete(prepared), log)
