"""`python -m backend`: read the settings, then serve the app with uvicorn."""

from __future__ import annotations

import sys

import uvicorn
from pydantic import ValidationError

from backend.engine.devices import limit_malloc_arenas
from backend.logging_setup import configure_logging
from backend.settings import Settings, describe_settings_error


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

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep the formatting configured above
        access_log=False,  # the request-context middleware writes one richer line per request
        # On SIGTERM uvicorn stops accepting, lets running requests finish for this long, then the
        # lifespan's shutdown aborts what is left.
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
