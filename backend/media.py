"""Image intake: from what a client sends (`data:` URI or bare base64) to an RGB `PIL.Image`, in memory.

Every route that takes images decodes them here, so limits and formats are enforced in one place. Errors are
400s that name the image (`messages[0].content[1]`). Nothing is written to disk.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from backend.errors import InvalidImageError

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)
ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP"}


def image_bytes_from_url(url: str, source: str) -> bytes:
    """The raw bytes of an `image_url.url`: a base64 `data:` URI, or bare base64."""
    url = url.strip()
    if url.lower().startswith(("http://", "https://")):
        raise InvalidImageError(
            f"The image at {source} is a web address; this server does not fetch images from URLs. "
            "Send the image inline as a data: URI (data:image/jpeg;base64,...).",
            param=source,
            code="image_url_not_allowed",
        )
    match = _DATA_URI.match(url)
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
        payload = url[match.end() :]
    elif ":" in url:  # base64 has no colon, so this is some other scheme (file:, ftp:, ...)
        scheme = url.split(":", 1)[0][:20]
        raise InvalidImageError(
            f"The image at {source} uses the unsupported scheme `{scheme}:`; send a data: URI.",
            param=source,
            code="invalid_image",
        )
    else:
        payload = url
    try:
        return base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(f"The image at {source} is not valid base64: {exc}", param=source, code="invalid_image")


def decode_image(data: bytes, source: str) -> Image.Image:
    """Decode, check and normalise one image: EXIF orientation applied, first frame, converted to RGB."""
    if not data:
        raise InvalidImageError(f"The image at {source} is empty.", param=source, code="invalid_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ALLOWED_FORMATS:
                raise InvalidImageError(
                    f"The image at {source} is {image.format}; send JPEG, PNG, WebP, GIF or BMP.",
                    param=source,
                    code="unsupported_image_format",
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(
            f"The image at {source} has too many pixels: {exc}", param=source, code="image_too_large"
        ) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidImageError(
            f"The image at {source} could not be decoded (corrupt, truncated or not an image): {exc}",
            param=source,
            code="invalid_image",
        ) from exc


def load_image_url(url: str, source: str) -> Image.Image:
    """`image_url.url` -> RGB image."""
    return decode_image(image_bytes_from_url(url, source), source)
