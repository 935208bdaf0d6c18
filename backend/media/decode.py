"""From bytes a client sent to one RGB `PIL.Image`, in memory, within the operator's limits.

JPEG, PNG, WebP, GIF (first frame) and BMP are accepted. The pixel count is checked from the header before
any pixel is decoded (decompression bombs). EXIF orientation is applied; palette, alpha, CMYK, 16-bit and
greyscale images become plain 8-bit RGB (transparency over white, as a photo viewer shows it).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.errors import ImageTooLargeError, InvalidImageError

ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "MPO"}  # MPO: JPEG from phone cameras, first frame
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)
_HIGH_BIT_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


def bytes_from_inline(value: str, source: str, max_bytes: int) -> bytes:
    """The bytes of an inline image: a base64 `data:image/...` URI, or bare base64."""
    value = value.strip()
    match = _DATA_URI.match(value)
    if match:
        if not match.group("b64"):
            raise InvalidImageError(
                f"The data: URI at {source} is not base64-encoded.", param=source, code="invalid_image"
            )
        mime = (match.group("mime") or "").lower()
        if mime and not mime.startswith("image/"):
            raise InvalidImageError(
                f"The data: URI at {source} has media type {mime}, not an image.", param=source, code="invalid_image"
            )
        value = value[match.end() :]
    elif ":" in value[:64]:  # base64 has no colon: this is some other scheme (file:, ftp:, ...)
        scheme = value.split(":", 1)[0][:20]
        raise InvalidImageError(
            f"The image at {source} uses the unsupported scheme `{scheme}:`; send a data: URI, bare base64, "
            "a file upload, or an http(s) URL from an allowed domain.",
            param=source,
            code="unsupported_image_source",
        )
    payload = re.sub(r"\s+", "", value)
    # 4 base64 characters carry 3 bytes: refuse an oversized image before decoding it.
    if len(payload) * 3 // 4 > max_bytes + 2:
        raise ImageTooLargeError(
            f"The image at {source} is larger than the limit of {max_bytes} bytes (MAX_IMAGE_BYTES).", param=source
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(
            f"The image at {source} is not valid base64: {exc}", param=source, code="invalid_image"
        ) from exc


def decode_image(data: bytes, source: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode and normalise one image to RGB, refusing what is too large, not an image, or broken."""
    if not data:
        raise InvalidImageError(f"The image at {source} is empty.", param=source, code="invalid_image")
    if len(data) > max_bytes:
        raise ImageTooLargeError(
            f"The image at {source} is {len(data)} bytes, above the limit of {max_bytes} (MAX_IMAGE_BYTES).",
            param=source,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            image = Image.open(io.BytesIO(data))
            if image.format not in ALLOWED_FORMATS:
                raise InvalidImageError(
                    f"The image at {source} is {image.format}; send JPEG, PNG, WebP, GIF or BMP.",
                    param=source,
                    code="unsupported_image_format",
                )
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"The image at {source} is {width}x{height} = {width * height} pixels, above the limit of "
                    f"{max_pixels} (MAX_IMAGE_PIXELS).",
                    param=source,
                )
            image.seek(0)  # animated GIF/WebP: the first frame
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except (InvalidImageError, ImageTooLargeError):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"The image at {source} has too many pixels: {exc}", param=source) from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(
            f"The image at {source} is not a recognisable image; send JPEG, PNG, WebP, GIF or BMP.",
            param=source,
            code="invalid_image",
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImageError(
            f"The image at {source} could not be decoded (corrupt, truncated or not an image): {exc}",
            param=source,
            code="invalid_image",
        ) from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB whatever the mode: transparency over white, 16-bit and float scaled, CMYK converted."""
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        if image.mode == "F":
            low, high = values.min(initial=0), values.max(initial=1)
            values, top = values - low, max(high - low, 1e-12)
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8))  # mode L
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image
