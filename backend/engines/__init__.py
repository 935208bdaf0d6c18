"""The model side, behind one interface.

- `client.py`: `EngineClient`, the interface the HTTP side (handlers, /health, /metrics, the app factory)
  depends on, and nothing below it.
- `events.py`, `requests.py`: what goes in and out of an engine, in engine-neutral terms (no torch).
- `transformers_engine/`: the engine that runs anywhere transformers runs (its own continuous batching).
- `fake.py`: an engine without a model, for tests of handler logic.

`create_engine(settings)` builds the configured engine; nothing else knows which one runs.
"""

from __future__ import annotations

from backend.engines.client import EngineClient
from backend.settings import Settings


def create_engine(settings: Settings) -> EngineClient:
    """The engine that serves MODEL_ID (imported here, so that the HTTP side never imports torch)."""
    from backend.engines.transformers_engine.engine import TransformersEngine

    return TransformersEngine(settings)
