"""`GET /metrics`: Prometheus exposition (vLLM's series names), open like /health."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    """Requests running/waiting, token counters, latency histograms, GPU memory."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
