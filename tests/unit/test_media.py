"""Image intake pieces: inline decoding, format normalisation, limits, the resize rule, URL policy."""

import base64
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from backend.errors import ImageTooLargeError, InvalidImageError, format_location
from backend.media.decode import DecodeLimits, bytes_from_inline, decode_image
from backend.media.fetch import FetchPolicy, is_public_address
from backend.media.resize import PixelBounds, image_token_count, smart_resize
from tests import images

SOURCE = "messages[0].content[1]"
MB = 2**20


def decode(data, max_bytes=20 * MB, max_pixels=50_000_000, budget=10**9, keep=10**9):
    limits = DecodeLimits(max_bytes=max_bytes, max_pixels=max_pixels, budget_pixels=budget, keep_pixels=keep)
    return decode_image(data, SOURCE, limits).image


@pytest.mark.parametrize(
    ("make", "size"),
    [
        (images.jpeg, (64, 48)),
        (images.png, (64, 48)),
        (images.webp, (50, 40)),
        (images.bmp, (50, 40)),
        (images.animated_gif, (40, 30)),
        (images.cmyk_jpeg, (32, 32)),
        (images.png_16_bit, (32, 32)),
        (images.palette_png_with_transparency, (32, 32)),
        (images.rgba_png, (30, 30)),
        (images.greyscale_png, (30, 30)),
        (images.exif_rotated_jpeg, (20, 40)),
    ],
)
def test_every_accepted_format_becomes_upright_rgb(make, size):
    image = decode(make())
    assert image.mode == "RGB" and image.size == size


def test_animated_gif_gives_its_first_frame():
    assert decode(images.animated_gif()).getpixel((5, 5))[0] > 200  # the red frame


def test_transparency_is_shown_over_white():
    assert decode(images.rgba_png()).getpixel((3, 3)) == (255, 255, 255)


def test_sixteen_bit_values_are_scaled_not_clipped():
    image = decode(images.png_16_bit())
    values = [image.getpixel((x, 31))[0] for x in range(0, 32, 8)]
    assert values == sorted(values) and values[-1] > 200 and values[0] < 250


@pytest.mark.parametrize(
    ("data", "error", "code"),
    [
        (images.png_bomb(), ImageTooLargeError, "image_too_large"),
        (images.truncated_jpeg(), InvalidImageError, "invalid_image"),
        (images.random_bytes(), InvalidImageError, "invalid_image"),
        (images.text_named_png(), InvalidImageError, "invalid_image"),
        (b"", InvalidImageError, "invalid_image"),
        (images.encode(images.photo(8, 8), "TIFF"), InvalidImageError, "unsupported_image_format"),
    ],
)
def test_bad_images_are_refused_naming_the_part(data, error, code):
    with pytest.raises(error) as caught:
        decode(data)
    assert caught.value.code == code and caught.value.param == SOURCE and SOURCE in caught.value.message


def test_byte_limit_is_413():
    with pytest.raises(ImageTooLargeError) as caught:
        decode(images.png(), max_bytes=100)
    assert caught.value.status_code == 413 and "MAX_IMAGE_BYTES" in caught.value.message


def test_inline_base64_forms():
    data = images.png()
    assert bytes_from_inline(images.as_data_uri(data), SOURCE, MB) == data
    assert bytes_from_inline(base64.b64encode(data).decode(), SOURCE, MB) == data
    assert bytes_from_inline("data:image/png;base64," + base64.encodebytes(data).decode(), SOURCE, MB) == data


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("file:///etc/passwd", "unsupported_image_source"),
        ("ftp://example.com/a.png", "unsupported_image_source"),
        ("data:image/png;base64,!!!notbase64", "invalid_image"),
        ("data:text/plain;base64,aGVsbG8=", "invalid_image"),
        ("data:image/png,rawbytes", "invalid_image"),
    ],
)
def test_bad_inline_values(value, code):
    with pytest.raises(InvalidImageError) as caught:
        bytes_from_inline(value, SOURCE, MB)
    assert caught.value.code == code


def test_oversized_base64_is_refused_before_decoding():
    with pytest.raises(ImageTooLargeError):
        bytes_from_inline("A" * 4000, SOURCE, 1000)


BOUNDS = PixelBounds(56 * 56, 360 * 420)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1, 1), (56, 56)),  # tiny: scaled up to the minimum area
        ((500, 19), (504, 28)),  # thin: one row of tokens
        ((4000, 3000), (448, 336)),  # large phone photo: within 360*420
        ((360, 420), (336, 420)),  # rounding up would pass max_pixels: scaled down instead
        ((28, 28), (56, 56)),
        ((640, 480), (448, 336)),
    ],
)
def test_smart_resize(size, expected):
    width, height = smart_resize(*size, BOUNDS)
    assert (width, height) == expected
    assert width % 28 == 0 and height % 28 == 0
    assert width * height <= BOUNDS.max_pixels
    assert width * height >= BOUNDS.min_pixels or min(size) == 0


def test_extreme_aspect_is_refused():
    with pytest.raises(ValueError):
        smart_resize(10000, 20, BOUNDS)


def test_token_count_is_one_per_28_pixel_block():
    assert image_token_count(420, 308) == 15 * 11


def test_requests_may_lower_bounds_but_never_raise_them():
    assert BOUNDS.narrowed(None, 10_000) == PixelBounds(3136, 10_000)
    assert BOUNDS.narrowed(None, 10**9) == BOUNDS
    assert BOUNDS.narrowed(10**6, None) == BOUNDS
    assert BOUNDS.narrowed(784, 2000) == PixelBounds(784, 2000)
    assert BOUNDS.narrowed(None, 1000) == PixelBounds(1000, 1000)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00:ec2::254", False),
        ("::ffff:127.0.0.1", False),
        ("2606:4700:4700::1111", True),
    ],
)
def test_public_address_rule(address, public):
    assert is_public_address(address) is public


def test_domain_allowlist_includes_subdomains_only():
    policy = FetchPolicy(("example.com",), False, 5, MB)
    assert policy.allows_host("example.com") and policy.allows_host("img.example.com")
    assert not policy.allows_host("badexample.com") and not policy.allows_host("example.com.evil.org")


def test_format_location():
    assert format_location(("body", "messages", 0, "content", "str")) == "messages[0].content"
    assert format_location(("body", "max_tokens")) == "max_tokens"
    assert format_location(("body",)) is None


def decoded(data, **limits):
    values = {"max_bytes": 20 * MB, "max_pixels": 50_000_000, "budget_pixels": 10**9, "keep_pixels": 10**9}
    return decode_image(data, SOURCE, DecodeLimits(**(values | limits)))


def test_a_sixteen_bit_image_is_converted_without_float_copies():
    """The audit's 7070x7070 16-bit grey PNG peaked at 1.3 GB in float64; conversion now goes in bands of
    integers, so numpy's peak stays near the 8-bit result (tracemalloc sees numpy's buffers)."""
    side = 3000
    big = images.encode(Image.fromarray(np.full((side, side), 40000, dtype=np.uint16)), "PNG")
    tracemalloc.start()
    try:
        result = decoded(big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.image.getpixel((10, 10)) == (156, 156, 156)  # 40000 / 65535 of 255, the high byte
    assert peak < side * side * 2  # the uint8 result (9 MB) and one band; float64 copies were 72 MB each


def test_large_images_are_shrunk_right_after_decoding_and_keep_their_original_size():
    result = decoded(images.encode(images.photo(1200, 900), "PNG"), keep_pixels=100_000)
    assert result.original_size == (1200, 900)
    assert result.image.size == (400, 300)  # reduced by a whole factor, still at least keep_pixels
    assert result.decoded_pixels == 1200 * 900


def test_a_big_jpeg_is_decoded_at_reduced_scale_within_the_pixel_cap():
    """A 4000x3000 JPEG over a 5-megapixel cap still decodes: the decoder reads it at 1/4 scale."""
    photo = images.encode(images.photo(4000, 3000), "JPEG")
    result = decoded(photo, max_pixels=5_000_000, keep_pixels=600_000)
    assert result.original_size == (4000, 3000)
    assert result.decoded_pixels <= 1000 * 750 * 2 and result.image.width * result.image.height >= 600_000
    with pytest.raises(ImageTooLargeError):  # a PNG of the same size has no cheap reduced decode
        decoded(images.encode(images.photo(4000, 3000), "PNG"), max_pixels=5_000_000, keep_pixels=600_000)


def test_the_exif_turn_applies_after_shrinking():
    result = decoded(images.exif_rotated_jpeg(400, 200), keep_pixels=5_000)
    assert result.original_size == (200, 400)  # shown portrait
    assert result.image.height > result.image.width


def test_the_requests_pixel_budget_is_413():
    with pytest.raises(ImageTooLargeError) as caught:
        decoded(images.png(), budget_pixels=100)
    assert "MAX_REQUEST_IMAGE_PIXELS" in caught.value.message
