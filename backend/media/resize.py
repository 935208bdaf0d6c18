"""Qwen2.5-VL's resize rule: both sides multiples of 28, area within [min_pixels, max_pixels].

Every 28x28 block becomes one token (14x14 patches merged 2x2), so the bounds fix both the detail the model
sees and the cost. The server resizes images itself, with this rule, before the image processor sees them:
token counts are known in advance, and tiny (1x1) or thin (500x19) images are scaled up instead of failing
inside the processor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from backend.errors import InvalidImageError

FACTOR = 28  # patch size 14 x spatial merge 2
MAX_ASPECT_RATIO = 200  # beyond this the vision tower cannot represent the image


@dataclass(frozen=True)
class PixelBounds:
    """The area bounds an image is resized into."""

    min_pixels: int
    max_pixels: int

    def narrowed(self, min_pixels: int | None, max_pixels: int | None) -> PixelBounds:
        """Bounds a request asked for: it may lower either bound, never raise one (values are clamped)."""
        high = min(max_pixels, self.max_pixels) if max_pixels else self.max_pixels
        low = min(min_pixels, self.min_pixels) if min_pixels else self.min_pixels
        return PixelBounds(min(low, high), high)


def smart_resize(width: int, height: int, bounds: PixelBounds) -> tuple[int, int]:
    """The (width, height) an image of this size is resized to."""
    if min(width, height) < 1:
        raise ValueError("an image side is 0 pixels")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ValueError(f"the aspect ratio is above {MAX_ASPECT_RATIO}:1")
    new_height = max(FACTOR, round(height / FACTOR) * FACTOR)
    new_width = max(FACTOR, round(width / FACTOR) * FACTOR)
    if new_height * new_width > bounds.max_pixels:
        beta = math.sqrt(height * width / bounds.max_pixels)
        new_height = max(FACTOR, math.floor(height / beta / FACTOR) * FACTOR)
        new_width = max(FACTOR, math.floor(width / beta / FACTOR) * FACTOR)
    elif new_height * new_width < bounds.min_pixels:
        beta = math.sqrt(bounds.min_pixels / (height * width))
        new_height = math.ceil(height * beta / FACTOR) * FACTOR
        new_width = math.ceil(width * beta / FACTOR) * FACTOR
    return new_width, new_height


def image_token_count(width: int, height: int) -> int:
    """Tokens an image of this (already resized) size costs: one per 28x28 block."""
    return (width // FACTOR) * (height // FACTOR)


def resize_for_model(image: Image.Image, bounds: PixelBounds, source: str) -> Image.Image:
    """The image at the size the model will see; a 400 naming the image if no size fits."""
    try:
        size = smart_resize(image.width, image.height, bounds)
    except ValueError as exc:
        raise InvalidImageError(
            f"The image at {source} ({image.width}x{image.height}) cannot be used: {exc}.",
            param=source,
            code="invalid_image_size",
        ) from exc
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)
