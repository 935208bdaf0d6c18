"""Image decoding errors name the image; validation errors become OpenAI envelopes with `param`."""

import base64

import pytest
from PIL import Image

from backend.errors import InvalidImageError, format_location
from backend.media import image_bytes_from_url, load_image_url
from tests.conftest import data_uri, image_bytes

SOURCE = "messages[0].content[1]"


def test_data_uri_and_bare_base64_decode_to_rgb():
    image = load_image_url(data_uri(30, 20), SOURCE)
    assert (image.mode, image.size) == ("RGB", (30, 20))
    bare = base64.b64encode(image_bytes(10, 12, "JPEG")).decode()
    assert load_image_url(bare, SOURCE).size == (10, 12)


def test_exif_orientation_is_applied():
    import io

    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    Image.new("RGB", (40, 20)).save(buffer, format="JPEG", exif=exif)
    image = load_image_url("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode(), SOURCE)
    assert image.size == (20, 40)


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("https://example.com/tongue.jpg", "image_url_not_allowed"),
        ("file:///etc/passwd", "invalid_image"),
        ("data:image/png;base64,!!!notbase64", "invalid_image"),
        ("data:text/plain;base64,aGVsbG8=", "invalid_image"),
        ("data:image/png,rawbytes", "invalid_image"),
        ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), "invalid_image"),
        ("data:image/png;base64," + base64.b64encode(image_bytes()[:40]).decode(), "invalid_image"),
        ("data:image/png;base64,", "invalid_image"),
    ],
)
def test_bad_images_are_400s_that_name_the_part(url, code):
    with pytest.raises(InvalidImageError) as caught:
        load_image_url(url, SOURCE)
    assert caught.value.status_code == 400
    assert caught.value.param == SOURCE
    assert caught.value.code == code
    assert SOURCE in caught.value.message


def test_unsupported_format_is_refused():
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="TIFF")
    with pytest.raises(InvalidImageError) as caught:
        load_image_url(base64.b64encode(buffer.getvalue()).decode(), SOURCE)
    assert caught.value.code == "unsupported_image_format"


def test_whitespace_in_base64_is_tolerated():
    encoded = base64.encodebytes(image_bytes()).decode()  # wrapped every 76 characters
    assert image_bytes_from_url("data:image/png;base64," + encoded, SOURCE) == image_bytes()


def test_format_location():
    assert format_location(("body", "messages", 0, "content")) == "messages[0].content"
    assert format_location(("body", "max_tokens")) == "max_tokens"
    assert format_location(("body",)) is None
