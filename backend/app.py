"""`create_app(settings, engine)`: the FastAPI application, its lifespan, middleware and routers.

Nothing happens at import: the model loads in the lifespan (in the background, so `/health` can say
`loading`), and a test can hand in its own engine and settings.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import RedirectResponse

from backend.engine.engine import Engine
from backend.errors import install_error_handlers
from backend.handlers.chat import ChatCompletionHandler
from backend.handlers.vision import VisionHandler
from backend.media import ImageIntake
from backend.routes import chat, health, models, vision
from backend.settings import Settings

logger = logging.getLogger(__name__)


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """Build the app around `engine` (by default one that loads MODEL_ID from `settings`)."""
    engine = engine or Engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
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

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID"],
        )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(chat.router)
    app.include_router(vision.router)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/docs")

    return app
