"""`POST /v1/vision/analyze`: images + a question (or a TCM task preset), as JSON or a multipart form."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from backend.dependencies import VisionHandlerDep
from backend.handlers.streaming import request_log, sse_response, unless_disconnected
from backend.protocol.common import ErrorResponse
from backend.protocol.vision import VisionAnalyzeRequest, VisionAnalyzeResponse

router = APIRouter(tags=["vision"])

_FORM_SCHEMA = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "prompt": {"type": "string"},
        "task": {"type": "string", "enum": ["tongue", "face", "herb", "general"]},
        "max_tokens": {"type": "integer"},
        "temperature": {"type": "number"},
        "stream": {"type": "boolean"},
    },
}
OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": VisionAnalyzeRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            },
            "multipart/form-data": {"schema": _FORM_SCHEMA},
        },
    }
}
# The errors every generation route answers are added by backend/openapi.py.
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 404, 413, 415, 503)}


@router.post(
    "/v1/vision/analyze",
    response_model=VisionAnalyzeResponse,
    responses=ERROR_RESPONSES | {200: {"content": {"text/event-stream": {}}}},
    openapi_extra=OPENAPI_BODY,
)
async def analyze_image(
    request: Request, handler: VisionHandlerDep
) -> VisionAnalyzeResponse | StreamingResponse | Response:
    """Analyse images (tongue, face, herb, or general) and answer with the text, sizes, tokens and timings."""
    log = request_log(request)
    prepared = await unless_disconnected(request, handler.prepare(request), log)
    if prepared.body.stream:
        streams = handler.start(prepared)  # before the headers: a full queue is a 429, not a broken stream
        return sse_response(handler.stream(prepared, streams, log), cancel=streams)
    return await unless_disconnected(request, handler.complete(prepared, log), log)
