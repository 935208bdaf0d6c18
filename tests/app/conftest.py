"""The app over httpx's ASGI transport, with its lifespan (model loading) really running."""

from __future__ import annotations

import httpx
import pytest
from asgi_lifespan import LifespanManager

from backend.app import create_app


@pytest.fixture(scope="session")
async def client(vl_settings):
    """A client of the app serving the tiny VL model, loaded and ready."""
    app = create_app(vl_settings)
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
        await app.state.engine.wait_until_loaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            yield http
