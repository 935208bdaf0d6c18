"""Malformed multipart bodies on `/v1/vision/analyze`: every one is a 4xx in the OpenAI error envelope.

A browser or `curl -F` always sends a well-formed form; these bodies come from broken clients, proxies that cut
a request short, or someone probing the server. None of them is the server's fault, so none may be a 500 (which
the error handlers reserve for bugs in this server) and each must say what was wrong in
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import pytest

from tests import images

URL = "/v1/vision/analyze"
BOUNDARY = "----test-boundary-7d3a"


def part(headers: list[str], body: bytes) -> bytes:
    """One part (without its leading boundary line): header lines, a blank line, the body."""
    return "".join(f"{line}\r\n" for line in headers).encode() + b"\r\n" + body + b"\r\n"


def form(*parts: bytes, boundary: str = BOUNDARY, closed: bool = True) -> bytes:
    """A multipart body made of `parts`; `closed=False` leaves out the closing boundary."""
    body = b"".join(f"--{boundary}\r\n".encode() + item for item in parts)
    return body + (f"--{boundary}--\r\n".encode() if closed else b"")


IMAGE = images.png(16, 16)
IMAGE_PART = part(['Content-Disposition: form-data; name="image"; filename="t.png"', "Content-Type: image/png"], IMAGE)
MAX_TOKENS_PART = part(['Content-Disposition: form-data; name="max_tokens"'], b"1")
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"

# (id, content-type header, body). Each is refused before any generation: the point is the status and envelope.
MALFORMED = [
    ("no boundary parameter", "multipart/form-data", form(IMAGE_PART)),
    ("empty boundary parameter", "multipart/form-data; boundary=", form(IMAGE_PART)),
    ("empty body", MULTIPART, b""),
    ("truncated inside the image data", MULTIPART, form(IMAGE_PART)[: form(IMAGE_PART).index(IMAGE) + len(IMAGE) // 2]),
    ("truncated inside the part headers", MULTIPART, f"--{BOUNDARY}\r\nContent-Disposition: form-da".encode()),
    ("no closing boundary", MULTIPART, form(MAX_TOKENS_PART, closed=False)),
    ("file part with no name", MULTIPART, form(part(['Content-Disposition: form-data; filename="t.png"'], IMAGE))),
    ("part with no Content-Disposition", MULTIPART, form(part(["Content-Type: image/png"], IMAGE))),
    (
        "non-UTF-8 text field",
        MULTIPART,
        form(IMAGE_PART, part(['Content-Disposition: form-data; name="prompt"'], b"\xff\xfe")),
    ),
    # Bodies python-multipart's parser rejects outright (it raises MultipartParseError, a ValueError):
    ("garbage bytes", MULTIPART, images.random_bytes(2000)),
    ("text that is not multipart", MULTIPART, b"image=hello&max_tokens=1"),
    (
        "boundary in the body differs from the header",
        MULTIPART,
        form(IMAGE_PART, boundary="other-boundary"),
    ),
    ("header line without a colon", MULTIPART, form(part(["this is not a header"], IMAGE))),
]
CASES = [pytest.param(content_type, body, id=name) for name, content_type, body in MALFORMED]


def assert_envelope(response) -> dict:
    """A 4xx whose body is exactly the OpenAI error envelope; returns the error object."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["type"] == "invalid_request_error", error
    return error


@pytest.mark.parametrize(("content_type", "body"), CASES)
async def test_malformed_multipart_is_a_4xx_envelope_never_a_500(client, content_type, body):
    """Each malformed body is answered 4xx with the envelope, and the server goes on serving."""
    response = await client.post(URL, content=body, headers={"content-type": content_type})
    assert_envelope(response)


async def test_the_same_form_well_made_is_analysed(client):
    """The baseline: the image part and field used above, in a well-formed body, get a 200 answer, so the
    bodies above are refused for their form, not for the image or the route."""
    response = await client.post(URL, content=form(IMAGE_PART, MAX_TOKENS_PART), headers={"content-type": MULTIPART})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 1


async def test_a_missing_boundary_says_what_is_expected(client):
    """The message names the fix (a multipart body with a boundary), not a parser's internals."""
    response = await client.post(URL, content=form(IMAGE_PART), headers={"content-type": "multipart/form-data"})
    error = assert_envelope(response)
    assert response.status_code == 400 and "boundary" in error["message"]
