"""`GET /health` (readiness with details) and `GET /ping` (RunPod's load-balancer convention)."""

from __future__ import annotations

import time
from dataclasses import asdict

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from backend.dependencies import EngineDep, SettingsDep
from backend.errors import error_body
from backend.protocol.health import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(engine: EngineDep, settings: SettingsDep, request: Request) -> JSONResponse:
    """Readiness and details of the loaded model: 200 when ready, 503 while loading or after a failed load.

    When API keys are set, a caller without one (a load balancer) gets the status alone: the model's path,
    memory and error texts are for the operator.
    """
    status = 200 if engine.state == "ready" else 503
    if not _authorized(request):
        return JSONResponse({"status": engine.state}, status_code=status)
    report = engine.report()
    model = engine.model
    common = {
        "status": engine.state,
        "error": engine.error,
        "engine": report.engine,
        "model_id": settings.model_id,
        "revision": settings.model_revision,
        "resolved_revision": model.resolved_revision if model is not None else None,
        "served_model_name": settings.model_name,
        "accepts_images": model.accepts_images if model is not None else None,
        "max_model_len": model.max_model_len if model is not None else None,
        "memory": report.memory,
        "uptime_seconds": round(time.time() - engine.started_at, 3),
        "generation": asdict(report.generation),
        "scheduler": report.queue or None,
    }
    # The engine's own facts (dtype, KV cache, ...) sit beside the common fields, which win a clash.
    body = HealthResponse(**{**report.details, **common})
    return JSONResponse(body.model_dump(mode="json"), status_code=status)


@router.get("/ping", status_code=200, responses={204: {"description": "still loading"}, 503: {}})
async def ping(engine: EngineDep, request: Request) -> Response:
    """200 when ready, 204 while the model loads, 503 when loading failed."""
    if engine.state == "ready":
        return JSONResponse({"status": "healthy"})
    if engine.state == "loading":
        return Response(status_code=204)
    # The reason is for the operator; a probe without a key (when keys are set) only learns that it failed.
    failure = engine.unavailable()
    message = failure.message if _authorized(request) else "The model is not available."
    return JSONResponse(error_body(message, "service_unavailable", code=failure.code), status_code=503)


def _authorized(request: Request) -> bool:
    """Whether the caller may see details: it sent a valid key, or no keys are set (see ApiKeyMiddleware)."""
    return request.scope.get("state", {}).get("authorized", True)
