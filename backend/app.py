"""`create_app(settings, engine)`: the FastAPI application, its lifespan, middleware and routers.

Nothing happens at import: the model loads in the lifespan (in the background, so `/health` can say
`loading`), and a test can hand in its own engine and settings.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from backend.engines import EngineClient, create_engine
from backend.errors import install_error_handlers
from backend.handlers.chat import ChatCompletionHandler
from backend.handlers.completions import CompletionHandler
from backend.handlers.vision import VisionHandler
from backend.host_guard import HostGuardMiddleware, HostPolicy
from backend.media import ImageIntake
from backend.metrics import Metrics
from backend.middleware import ApiKeyMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from backend.openapi import install_openapi
from backend.routes import chat, completions, health, metrics, models, vision
from backend.settings import Settings

logger = logging.getLogger(__name__)


LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
STATIC_DIR = Path(__file__).parent / "static"


def warn_about_exposure(settings: Settings) -> None:
    """Loud warnings for configurations that let strangers use the GPU or read answers."""
    if not settings.api_key and settings.host not in LOOPBACK_HOSTS:
        logger.warning(
            "!!! No API_KEY is set and the server listens on %s: anyone who can reach this address (on RunPod: "
            "anyone with the proxy URL) can use the model. Set API_KEY to one or more secret keys. !!!",
            settings.host,
        )
    if "*" in settings.cors_origins:
        logger.warning(
            "CORS_ORIGINS=*: any web page the user opens may call this server%s. List your front end's "
            "origin(s) in CORS_ORIGINS instead (the server's own page needs none).",
            " with a key it holds" if settings.api_key else ", and no API_KEY is set",
        )
    if "*" in settings.allowed_hosts:
        logger.warning("ALLOWED_HOSTS=*: any host name is served, which DNS-rebinding pages can use.")


def create_app(settings: Settings, engine: EngineClient | None = None) -> FastAPI:
    """Build the app around `engine` (by default the configured one, loading MODEL_ID from `settings`)."""
    engine = engine or create_engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        warn_about_exposure(settings)
        await engine.start()
        warm_up = engine.start_warm_up() if settings.warmup else None
        try:
            yield
        finally:
            if warm_up is not None:
                warm_up.cancel()
            await engine.shutdown()

    app = FastAPI(
        title="ShizhenGPT server",
        summary="OpenAI-compatible API for ShizhenGPT and other Qwen2.5-VL / Qwen2.5 models",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    intake = ImageIntake(settings)
    app.state.chat_handler = ChatCompletionHandler(engine, settings, intake)
    app.state.vision_handler = VisionHandler(engine, settings, intake, app.state.chat_handler)
    app.state.completion_handler = CompletionHandler(engine, settings)
    app.state.metrics = Metrics(settings.model_name, engine)
    engine.add_listener(app.state.metrics.record)

    # Added innermost first: a request meets CORS, then the request id and log line, then the host and
    # origin check, then the key check, then the body limits. CORS outermost means even a 401 or 413 can be
    # read by a browser page.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        read_timeout_seconds=settings.body_read_timeout_seconds,
    )
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys)
    ports = [settings.port] + ([settings.port_health] if settings.port_health else [])
    policy = HostPolicy.from_settings(settings.allowed_hosts, settings.cors_origins, settings.runpod_pod_id, ports)
    app.add_middleware(HostGuardMiddleware, policy=policy)
    app.add_middleware(RequestContextMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID"],
        )
    install_error_handlers(app)
    install_openapi(app, api_keys_set=bool(settings.api_key))
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(models.router)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(vision.router)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def web_page() -> FileResponse:
        """The web chat (backend/static): same origin as the API, so it works through the pod's proxy."""
        return FileResponse(STATIC_DIR / "index.html")

    return app
