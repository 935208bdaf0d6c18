"""From bytes a client sent to one RGB `PIL.Image`, in memory, within the operator's limits.

JPEG, PNG, WebP, GIF (first frame) and BMP are accepted. The pixel count is checked from the header before
any pixel is decoded (decompression bombs), against the image's and the request's limits. Memory stays near
what the model needs: large JPEGs are decoded at 1/2 to 1/8 scale, every image is shrunk by a whole factor
right after decoding, and 16-bit images are converted in bands of integers. EXIF orientation is applied;
palette, alpha, CMYK, 16-bit and greyscale images become plain 8-bit RGB (transparency over white, as a photo
viewer shows it).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from backend.errors import ImageTooLargeError, InvalidImageError

ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "MPO"}  # MPO: JPEG from phone cameras, first frame
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)
_HIGH_BIT_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
_BAND_ROWS = 256  # rows converted at a time from a high-bit-depth image
_EXIF_ORIENTATION = 0x0112
# What each EXIF orientation needs to be upright (as ImageOps.exif_transpose does); 5 to 8 swap the sides.
_EXIF_TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


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


@dataclass(frozen=True)
class DecodedImage:
    """An image ready for the model's resize: RGB, upright, already shrunk near what the model needs."""

    source: str
    image: Image.Image
    original_size: tuple[int, int]  # (width, height) as sent, after EXIF rotation
    decoded_pixels: int  # the area the decoder produced (counted against the request's total)


@dataclass(frozen=True)
class DecodeLimits:
    """How large an image may be, and how small it is kept once decoded."""

    max_bytes: int
    max_pixels: int  # the largest area decoded (MAX_IMAGE_PIXELS)
    budget_pixels: int  # what is left of the request's total (MAX_REQUEST_IMAGE_PIXELS)
    keep_pixels: int  # images are shrunk right after decoding to no less than this area


def decode_image(data: bytes, source: str, limits: DecodeLimits) -> DecodedImage:
    """Decode and normalise one image to RGB, refusing what is too large, not an image, or broken.

    The image is shrunk to not much more than `keep_pixels` (the model never sees more than MAX_PIXELS).
    JPEGs are decoded at a reduced scale when they are larger than needed (the decoder skips the detail),
    so a phone photo costs a fraction of its full size.
    """
    if not data:
        raise InvalidImageError(f"The image at {source} is empty.", param=source, code="invalid_image")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(
            f"The image at {source} is {len(data)} bytes, above the limit of {limits.max_bytes} (MAX_IMAGE_BYTES).",
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
            original = image.size
            if image.format in ("JPEG", "MPO") and original[0] * original[1] > limits.keep_pixels:
                scale = math.sqrt(original[0] * original[1] / limits.keep_pixels)
                image.draft(None, (math.ceil(original[0] / scale), math.ceil(original[1] / scale)))
            _check_area(image.size, original, source, limits)
            decoded_pixels = image.width * image.height
            orientation = image.getexif().get(_EXIF_ORIENTATION)
            image.seek(0)  # animated GIF/WebP: the first frame
            image.load()
            # Shrink before anything else copies the pixels; turn upright afterwards, on the small image.
            image = shrink(to_8bit(image), limits.keep_pixels)
            if orientation in _EXIF_TURNS:
                image = image.transpose(_EXIF_TURNS[orientation])
                original = original[::-1] if orientation >= 5 else original
            return DecodedImage(source, to_rgb(image), original, decoded_pixels)
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


def _check_area(decoded: tuple[int, int], original: tuple[int, int], source: str, limits: DecodeLimits) -> None:
    """413 when the area about to be decoded is over the image's or the request's limit."""
    area = decoded[0] * decoded[1]
    size = f"{original[0]}x{original[1]}" + (f" (decoded at {decoded[0]}x{decoded[1]})" if decoded != original else "")
    if area > limits.max_pixels:
        raise ImageTooLargeError(
            f"The image at {source} is {size} = {area} pixels, above the limit of {limits.max_pixels} "
            "(MAX_IMAGE_PIXELS).",
            param=source,
        )
    if area > limits.budget_pixels:
        raise ImageTooLargeError(
            f"The image at {source} ({size}) would take the request's images over their total of pixels "
            "(MAX_REQUEST_IMAGE_PIXELS); send fewer or smaller images.",
            param=source,
        )


def shrink(image: Image.Image, keep_pixels: int) -> Image.Image:
    """Reduce by a whole factor (box filter, cheap) while the area stays at least `keep_pixels`."""
    factor = math.isqrt(image.width * image.height // max(keep_pixels, 1))
    return image.reduce(factor) if factor >= 2 else image


def to_8bit(image: Image.Image) -> Image.Image:
    """Palette, 1-bit and 16/32-bit/float images as 8-bit modes (what `Image.reduce` and the model take).

    High-bit-depth images are converted a band of rows at a time in integer arithmetic: a 16-bit 7000x7000
    PNG costs its own 98 MB plus 49 MB for the result, not gigabytes of float64 copies.
    """
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        return _high_depth_to_l(image)
    if image.mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode == "1":
        return image.convert("L")
    return image


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    low, high = image.getextrema()
    width, height = image.size
    out = np.empty((height, width), dtype=np.uint8)
    for top in range(0, height, _BAND_ROWS):
        band = np.asarray(image.crop((0, top, width, min(top + _BAND_ROWS, height))))
        if image.mode == "F":  # floats: stretch the image's own range to 0..255
            scaled = (band - np.float32(low)) * np.float32(255.0 / max(high - low, 1e-12)) + np.float32(0.5)
            out[top : top + band.shape[0]] = np.clip(scaled, 0, 255).astype(np.uint8)
        elif image.mode.startswith("I;16") or high > 255:  # 16-bit range: keep the high byte
            out[top : top + band.shape[0]] = (np.clip(band, 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
        else:  # 32-bit integers that hold 8-bit values
            out[top : top + band.shape[0]] = np.clip(band, 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB whatever the mode: transparency over white, 16-bit and float scaled, CMYK converted."""
    image = to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image
