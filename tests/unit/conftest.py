"""Models loaded once per module for the engine-level tests (the real loader, the tiny checkpoints)."""

import pytest

from backend.engines.transformers_engine.loader import load_model
from tests.conftest import make_settings


@pytest.fixture(scope="module")
def vl(tiny_vl_dir):
    """The tiny Qwen2.5-VL model, loaded as the server loads it."""
    return load_model(make_settings(tiny_vl_dir))


@pytest.fixture(scope="module")
def text_only(tiny_text_dir):
    """The tiny text-only Qwen2 model."""
    return load_model(make_settings(tiny_text_dir))
