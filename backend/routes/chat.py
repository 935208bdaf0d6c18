"""`POST /v1/chat/completions`: OpenAI-compatible chat with text and images, streamed or not."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from backend.dependencies import ChatHandlerDep
from backend.handlers.streaming import request_log, sse_response, unless_disconnected
from backend.protocol.chat import ChatCompletionRequest, ChatCompletionResponse
from backend.protocol.common import ErrorResponse

router = APIRouter(tags=["chat"])

# The errors every generation route answers are added by backend/openapi.py.
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 404, 413, 503)}
STREAM_RESPONSE = {200: {"content": {"text/event-stream": {}}, "description": "SSE chunks when stream=true"}}


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=ERROR_RESPONSES | STREAM_RESPONSE,
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, handler: ChatHandlerDep
) -> ChatCompletionResponse | StreamingResponse | Response:
    """Answer a conversation (text, and images as `image_url` parts); `stream: true` answers with SSE."""
    # Input is checked and images decoded before the response starts, so bad input is a 4xx, not an
    # error event; from then on a stream sends its headers and first chunk at once.
    log = request_log(request)
    prepared = await unless_disconnected(request, handler.prepare(body), log)
    if body.stream:
        streams = handler.start(prepared)  # before the headers: a full queue is a 429, not a broken stream
        return sse_response(handler.stream(prepared, streams, body.include_usage, log=log), cancel=streams)
    return await unless_disconnected(request, handler.complete(prepared, log), log)
