"""`POST /v1/chat/completions`: OpenAI-compatible chat with text and images."""

from __future__ import annotations

from fastapi import APIRouter

from backend.dependencies import ChatHandlerDep
from backend.errors import InvalidRequestError
from backend.protocol.chat import ChatCompletionRequest, ChatCompletionResponse
from backend.protocol.common import ErrorResponse

router = APIRouter(tags=["chat"])

ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 404, 413, 503)}


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
async def create_chat_completion(request: ChatCompletionRequest, handler: ChatHandlerDep) -> ChatCompletionResponse:
    """Answer a conversation (text, and images as `image_url` parts)."""
    if request.stream:
        raise InvalidRequestError("Streaming is not available on this server yet; send stream=false.", param="stream")
    return await handler.complete(request)
