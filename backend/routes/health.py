"""`GET /health` (readiness with details) and `GET /ping` (RunPod's load-balancer convention)."""

from __future__ import annotations

import time
from dataclasses import asdict

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from backend.dependencies import EngineDep
from backend.engine.devices import memory_report
from backend.errors import error_body
from backend.protocol.health import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(engine: EngineDep, request: Request) -> JSONResponse:
    """Readiness and details of the loaded model: 200 when ready, 503 while loading or after a failed load.

    When API keys are set, a caller without one (a load balancer) gets the status alone: the model's path,
    memory and error texts are for the operator.
    """
    status = 200 if engine.state == "ready" else 503
    if not _authorized(request):
        return JSONResponse({"status": engine.state}, status_code=status)
    settings = engine.settings
    body = HealthResponse(
        status=engine.state,
        error=engine.error,
        model_id=settings.model_id,
        revision=settings.model_revision,
        served_model_name=settings.model_name,
        memory=memory_report(),
        uptime_seconds=round(time.time() - engine.started_at, 3),
        generation=asdict(engine.stats),
    )
    if (scheduler := engine.scheduler) is not None:
        body.scheduler = {
            "running": scheduler.running,
            "waiting": scheduler.waiting,
            "peak_running": scheduler.peak_running,
            "peak_waiting": scheduler.peak_waiting,
            "max_batch_size": scheduler.max_batch_size,
            "max_queue": scheduler.max_queue,
            "prefill_passes": scheduler.prefill_passes,
            "prefill_ms": round(scheduler.prefill_seconds * 1000),
            "decode_steps": scheduler.decode_steps,
            "decode_ms": round(scheduler.decode_seconds * 1000),
        }
    if (loaded := engine.loaded) is not None:
        body.resolved_revision = loaded.resolved_revision
        body.accepts_images = loaded.accepts_images
        body.dtype = str(loaded.dtype).removeprefix("torch.")
        body.device = str(loaded.device)
        body.device_map = loaded.device_map
        body.parameters = loaded.parameter_count
        body.max_model_len = loaded.max_model_len
        body.load_seconds = round(loaded.load_seconds, 3)
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
