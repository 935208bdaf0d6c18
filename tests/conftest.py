"""Shared fixtures: tiny checkpoints written once per session, settings that point at them, test images."""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_tiny_model  # noqa: E402

from backend.settings import Settings  # noqa: E402


@pytest.fixture(scope="session")
def tiny_vl_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2.5-VL checkpoint, made by the project's own script."""
    out = tmp_path_factory.mktemp("models") / "tiny-vl"
    make_tiny_model.main(["--out", str(out)])
    return out


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory) -> Path:
    """A tiny text-only Qwen2 checkpoint (the shape of ShizhenGPT-32B-LLM)."""
    out = tmp_path_factory.mktemp("models") / "tiny-text"
    make_tiny_model.main(["--out", str(out), "--text-only"])
    return out


def make_settings(model_dir: Path, **overrides) -> Settings:
    """Settings for tests: the given checkpoint, no .env file from the developer's checkout, and the tiny
    model on the CPU in float32 (what the tests expect: `/health` says so, answers are compared exactly)
    even on a machine with a GPU or a DEVICE_MAP/DTYPE in its environment."""
    values = {
        "model_id": str(model_dir),
        "served_model_name": "tiny",
        "device_map": "cpu",
        "dtype": "float32",
        **overrides,
    }
    return Settings(_env_file=None, **values)


@pytest.fixture(scope="session")
def vl_settings(tiny_vl_dir) -> Settings:
    """Settings serving the tiny VL model as `tiny`."""
    return make_settings(tiny_vl_dir)


def image_bytes(width: int = 64, height: int = 48, fmt: str = "PNG", color=(200, 40, 60)) -> bytes:
    """A small generated image, encoded."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format=fmt)
    return buffer.getvalue()


def data_uri(width: int = 64, height: int = 48, fmt: str = "PNG") -> str:
    """The image as a `data:` URI, as the OpenAI client sends it."""
    mime = {"PNG": "image/png", "JPEG": "image/jpeg"}[fmt]
    return f"data:{mime};base64," + base64.b64encode(image_bytes(width, height, fmt)).decode()
