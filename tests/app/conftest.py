"""The app over httpx's ASGI transport, with its lifespan (model loading) really running."""

from __future__ import annotations

import httpx
import pytest
from asgi_lifespan import LifespanManager

from backend.app import create_app
from tests.conftest import make_settings


@pytest.fixture(scope="session")
async def client(vl_settings):
    """A client of the app serving the tiny VL model, loaded and ready."""
    app = create_app(vl_settings)
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
        await app.state.engine.wait_until_loaded()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=60) as http:
            yield http


@pytest.fixture
async def app_client(tiny_vl_dir):
    """A factory of fresh apps with their own settings (`await app_client(max_queue=1)`), each loaded and
    ready, returned with a client; all are shut down after the test."""
    managers = []

    async def make(**overrides):
        app = create_app(make_settings(tiny_vl_dir, **overrides))
        manager = LifespanManager(app, startup_timeout=60, shutdown_timeout=60)
        await manager.__aenter__()
        managers.append(manager)
        await app.state.engine.wait_until_loaded()
        transport = httpx.ASGITransport(app=app)
        return app, httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=120)

    yield make
    for manager in managers:
        await manager.__aexit__(None, None, None)
