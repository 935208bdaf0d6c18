"""Test images made on the fly (never downloaded): every accepted format and the awkward cases."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def photo(width: int = 64, height: int = 48, color=(190, 70, 80)) -> Image.Image:
    """A plain RGB image with a gradient, so resizing has something to do."""
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
    pixels = np.broadcast_to(x, (height, width, 3)).copy()
    pixels[..., 0] = color[0]
    return Image.fromarray(pixels)


def jpeg(width=64, height=48) -> bytes:
    return encode(photo(width, height), "JPEG", quality=90)


def png(width=64, height=48) -> bytes:
    return encode(photo(width, height), "PNG")


def exif_rotated_jpeg(width=40, height=20) -> bytes:
    """Stored landscape, EXIF orientation 6: shown (and decoded) as portrait height x width."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo(width, height), "JPEG", exif=exif)


def cmyk_jpeg() -> bytes:
    return encode(photo(32, 32).convert("CMYK"), "JPEG")


def png_16_bit() -> bytes:
    values = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64).astype(np.uint16)
    return encode(Image.fromarray(values), "PNG")


def palette_png_with_transparency() -> bytes:
    image = photo(32, 32).convert("P")
    return encode(image, "PNG", transparency=0)


def rgba_png() -> bytes:
    image = Image.new("RGBA", (30, 30), (255, 0, 0, 0))
    return encode(image, "PNG")


def greyscale_png() -> bytes:
    return encode(photo(30, 30).convert("L"), "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 30), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def webp() -> bytes:
    return encode(photo(50, 40), "WEBP")


def bmp() -> bytes:
    return encode(photo(50, 40), "BMP")


def png_bomb(side: int = 20000) -> bytes:
    """A valid PNG of side x side greyscale pixels that compresses to a few hundred kilobytes."""
    raw_row = b"\x00" + b"\x00" * side
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(raw_row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    whole = jpeg(200, 200)
    return whole[: len(whole) // 2]


def random_bytes(size: int = 2048) -> bytes:
    return np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()


def text_named_png() -> bytes:
    return "这不是图片，只是一个文本文件。\n".encode()


def as_data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()
