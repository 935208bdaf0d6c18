"""`python -m backend`: read the settings, then serve the app with uvicorn (and a health port if asked)."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import uvicorn
from pydantic import ValidationError
from starlette.responses import JSONResponse

from backend.errors import error_body
from backend.http_protocol import with_header_deadline
from backend.logging_setup import configure_logging
from backend.process_memory import limit_malloc_arenas
from backend.settings import Settings, describe_settings_error

HEALTH_PATHS = frozenset({"/ping", "/health"})


def health_only(app):
    """An ASGI app that passes /ping and /health to `app` and answers 404 to everything else."""

    async def health_app(scope, receive, send):
        if scope["type"] == "http" and scope["path"] in HEALTH_PATHS:
            await app(scope, receive, send)
            return
        if scope["type"] != "http":
            return  # no websockets or lifespan here: the main server owns the app's lifespan
        message = f"{scope['path']} is not served on the health port (PORT_HEALTH); use PORT"
        response = JSONResponse(error_body(message, "invalid_request_error", code="not_found"), status_code=404)
        await response(scope, receive, send)

    return health_app


class HealthServer(uvicorn.Server):
    """The health port's server: it leaves signals to the main server, which stops it when it is done."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def serve(app, settings: Settings) -> None:
    """Serve `app` on PORT; with a different PORT_HEALTH, answer /ping and /health there too."""
    common = {
        "host": settings.host,
        "log_level": settings.log_level,
        "log_config": None,  # keep the formatting configured by configure_logging
        "access_log": False,  # the request-context middleware writes one richer line per request
        "http": with_header_deadline(settings.header_read_timeout_seconds),  # slow-header clients are cut off
        "limit_concurrency": settings.max_connections,  # beyond it uvicorn answers 503 rather than queueing
    }
    # On SIGTERM uvicorn stops accepting, lets running requests finish for this long, then the lifespan's
    # shutdown aborts what is left.
    main = uvicorn.Server(uvicorn.Config(app, port=settings.port,
                                         timeout_graceful_shutdown=settings.shutdown_grace_seconds, **common))
    if settings.port_health in (None, settings.port):
        main.run()
        return
    health = HealthServer(uvicorn.Config(health_only(app), port=settings.port_health, lifespan="off", **common))

    async def serve_both() -> None:
        health_task = asyncio.create_task(health.serve())
        try:
            await main.serve()
        finally:
            health.should_exit = True
            await health_task

    with asyncio.Runner(loop_factory=main.config.get_loop_factory()) as runner:  # uvloop, as main.run() uses
        runner.run(serve_both())


def main() -> int:
    """Start the server; a bad setting ends here with a message that names the variable."""
    try:
        settings = Settings()
    except ValidationError as error:
        print(describe_settings_error(error), file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    limit_malloc_arenas()  # before any worker thread exists
    from backend.app import create_app  # imported after logging is set up: torch and transformers are slow

    serve(create_app(settings), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
