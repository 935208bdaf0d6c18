"""`GET /metrics`: Prometheus exposition (vLLM's series names), open like /health."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from backend.dependencies import EngineDep

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request, engine: EngineDep) -> Response:
    """Requests running/waiting, token counters, latency histograms, GPU memory."""
    return Response(request.app.state.metrics.render(engine), media_type=CONTENT_TYPE_LATEST)
