"""`/v1/vision/analyze` and the shared image intake over HTTP: every format and awkward image, limits, URL
fetching rules against a local test server, task presets, the disclaimer, streaming, and JSON vs multipart."""

import http.server
import threading

import httpx
import pytest
from asgi_lifespan import LifespanManager

from backend.app import create_app
from backend.handlers.vision import TASK_PROMPTS, build_prompt
from backend.media.resize import PixelBounds, image_token_count, smart_resize
from tests import images
from tests.conftest import make_settings
from tests.helpers import parse_sse

URL = "/v1/vision/analyze"
BOUNDS = PixelBounds(56 * 56, 360 * 420)


async def upload(client, data, filename="tongue.jpg", **fields):
    form = {"max_tokens": "3", "temperature": "0", **{k: str(v) for k, v in fields.items()}}
    return await client.post(URL, files={"image": (filename, data, "application/octet-stream")}, data=form)


def expect_error(response, status, code=None, param_contains=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code:
        assert error["code"] == code, error
    if param_contains:
        assert param_contains in (error["param"] or "")
    return error["message"]


CASES = [
    ("jpeg", images.jpeg, (64, 48)),
    ("png", images.png, (64, 48)),
    ("webp", images.webp, (50, 40)),
    ("bmp", images.bmp, (50, 40)),
    ("gif", images.animated_gif, (40, 30)),
    ("exif rotated", images.exif_rotated_jpeg, (20, 40)),
    ("cmyk", images.cmyk_jpeg, (32, 32)),
    ("16-bit", images.png_16_bit, (32, 32)),
    ("palette+alpha", images.palette_png_with_transparency, (32, 32)),
    ("greyscale", images.greyscale_png, (30, 30)),
    ("1x1", lambda: images.png(1, 1), (1, 1)),
    ("500x19", lambda: images.png(500, 19), (500, 19)),
    ("4000x3000", lambda: images.jpeg(4000, 3000), (4000, 3000)),
]


@pytest.mark.parametrize(("name", "make", "size"), CASES, ids=[case[0] for case in CASES])
async def test_every_format_and_odd_size_is_analysed_with_the_resize_rule(client, name, make, size):
    response = await upload(client, make())
    assert response.status_code == 200, response.text
    body = response.json()
    [image] = body["images"]
    width, height = smart_resize(*size, BOUNDS)
    assert (image["original_width"], image["original_height"]) == size
    assert (image["width"], image["height"]) == (width, height)
    assert image["image_tokens"] == image_token_count(width, height)
    assert body["usage"]["completion_tokens"] == 3 and body["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("make", "status", "code"),
    [
        (images.png_bomb, 413, "image_too_large"),
        (images.truncated_jpeg, 400, "invalid_image"),
        (images.random_bytes, 400, "invalid_image"),
        (images.text_named_png, 400, "invalid_image"),
        (lambda: images.png(10000, 20), 400, "invalid_image_size"),
    ],
)
async def test_bad_uploads_are_4xx_naming_the_image(client, make, status, code):
    message = expect_error(await upload(client, make(), filename="x.png"), status, code, "image[0]")
    assert "image[0]" in message


async def test_the_same_cases_through_the_chat_route(client):
    def chat_with(data_uri):
        content = [{"type": "text", "text": "看"}, {"type": "image_url", "image_url": {"url": data_uri}}]
        return client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], "max_tokens": 1}
        )

    expect_error(
        await chat_with(images.as_data_uri(images.png_bomb())), 413, "image_too_large", "messages[0].content[1]"
    )
    expect_error(
        await chat_with(images.as_data_uri(images.truncated_jpeg())), 400, "invalid_image", "messages[0].content[1]"
    )
    expect_error(await chat_with("https://example.com/t.jpg"), 400, "image_url_not_allowed")
    assert (await chat_with(images.as_data_uri(images.png(1, 1)))).status_code == 200
    assert (await chat_with(images.as_data_uri(images.png(500, 19)))).status_code == 200


async def test_json_body_with_images_and_a_task(client):
    body = {
        "image": [images.as_data_uri(images.jpeg()), images.as_data_uri(images.png(100, 100))],
        "task": "herb",
        "max_tokens": 2,
        "temperature": 0,
    }
    response = await client.post(URL, json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["task"] == "herb" and [image["source"] for image in result["images"]] == ["image[0]", "image[1]"]
    assert result["object"] == "vision.analysis" and result["model"] == "tiny"
    assert set(result["timings"]) == {"preprocessing_ms", "queue_ms", "time_to_first_token_ms", "generation_ms"}
    assert result["timings"]["preprocessing_ms"] > 0


async def test_the_disclaimer_ends_every_answer(client, vl_settings):
    result = (await upload(client, images.jpeg(), task="tongue")).json()
    assert result["disclaimer"] == vl_settings.medical_disclaimer
    assert result["analysis"].endswith("\n\n" + vl_settings.medical_disclaimer)


async def test_presets_and_prompts_change_the_prompt_as_documented(client):
    async def prompt_tokens(**fields):
        return (await upload(client, images.jpeg(), **fields)).json()["usage"]["prompt_tokens"]

    tongue = await prompt_tokens(task="tongue")
    tongue_plus = await prompt_tokens(task="tongue", prompt="舌边有齿痕吗？")
    alone = await prompt_tokens(prompt="舌边有齿痕吗？")
    general = await prompt_tokens()
    assert tongue_plus > tongue > alone and general != tongue
    assert build_prompt(None, None) == TASK_PROMPTS["general"]
    assert build_prompt("face", "脸色发黄") == TASK_PROMPTS["face"] + "\n\n补充问题：脸色发黄"
    assert build_prompt(None, "只问这个") == "只问这个"


async def test_a_request_may_lower_max_pixels_but_not_raise_it(client):
    big = images.jpeg(1000, 800)
    default = (await upload(client, big)).json()["images"][0]
    lowered = (await upload(client, big, max_pixels=28 * 28 * 20)).json()["images"][0]
    raised = (await upload(client, big, max_pixels=10**7)).json()["images"][0]
    assert lowered["image_tokens"] <= 20 < default["image_tokens"]
    assert raised == default


async def test_form_fields_are_typed_and_validated(client):
    expect_error(await upload(client, images.jpeg(), max_tokens="lots"), 400, param_contains="max_tokens")
    expect_error(await upload(client, images.jpeg(), task="palm"), 400, param_contains="task")
    expect_error(
        await client.post(URL, data={"prompt": "no image"}, files={"other": ("a.txt", b"x")}), 400, "image_required"
    )
    expect_error(await client.post(URL, json={"prompt": "no image"}), 400, "image_required", "image")
    expect_error(await client.post(URL, content=b"hello", headers={"content-type": "text/plain"}), 415)
    expect_error(await client.post(URL, content=b"{bad json", headers={"content-type": "application/json"}), 400)
    expect_error(
        await client.post(URL, json={"image": images.as_data_uri(images.jpeg()), "n": 2}), 400, param_contains="n"
    )


async def test_streaming_analysis_uses_the_chat_chunks_and_ends_with_the_disclaimer(client, vl_settings):
    response = await upload(client, images.jpeg(), task="tongue", stream="true")
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]"
    contents = [c["delta"].get("content") for e in events if isinstance(e, dict) for c in e["choices"]]
    assert contents[-2] == "\n\n" + vl_settings.medical_disclaimer
    assert events[0]["object"] == "chat.completion.chunk"


class _ImageServer(http.server.BaseHTTPRequestHandler):
    """A local web server for the URL-fetching rules."""

    port = 0

    def do_GET(self):
        routes = {
            "/tongue.png": (200, {"Content-Type": "image/png"}, images.png(80, 60)),
            "/huge.png": (200, {"Content-Type": "image/png"}, images.random_bytes(300_000)),
            "/redirect-off": (302, {"Location": f"http://127.0.0.1:{self.port}/tongue.png"}, b""),
            "/redirect-on": (302, {"Location": f"http://localhost:{self.port}/tongue.png"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
        }
        status, headers, body = routes.get(self.path, (404, {}, b"not found"))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageServer)
    _ImageServer.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield _ImageServer.port
    server.shutdown()


async def app_client(settings):
    app = create_app(settings)
    manager = LifespanManager(app, startup_timeout=60)
    await manager.__aenter__()
    await app.state.engine.wait_until_loaded()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost", timeout=60)
    return manager, client


async def json_image(client, url):
    return await client.post(URL, json={"image": url, "max_tokens": 1})


async def test_urls_to_internal_addresses_are_refused_even_when_allowlisted(tiny_vl_dir, image_server):
    settings = make_settings(
        tiny_vl_dir, image_url_allowed_domains="127.0.0.1,10.0.0.1,169.254.169.254,localhost,example.com"
    )
    manager, client = await app_client(settings)
    try:
        for url in (
            f"http://127.0.0.1:{image_server}/tongue.png",
            "http://10.0.0.1/tongue.png",
            "http://169.254.169.254/latest/meta-data/",
            f"http://localhost:{image_server}/tongue.png",  # a name that resolves to loopback
        ):
            message = expect_error(await json_image(client, url), 400, "image_url_not_allowed", "image[0]")
            assert "address" in message
        expect_error(await json_image(client, "http://not-allowed.org/x.png"), 400, "image_url_not_allowed")
        expect_error(await json_image(client, "file:///etc/passwd"), 400, "unsupported_image_source")
        assert (await upload(client, images.jpeg())).status_code == 200  # and the server still answers
    finally:
        await client.aclose()
        await manager.__aexit__(None, None, None)


async def test_allowed_urls_are_fetched_and_redirects_are_checked(tiny_vl_dir, image_server):
    settings = make_settings(
        tiny_vl_dir,
        image_url_allowed_domains="localhost",
        image_url_allow_private_networks=True,  # the test server is on loopback
        max_image_bytes=200_000,
        max_images_per_request=2,
        max_request_bytes=400_000,
    )
    manager, client = await app_client(settings)
    base = f"http://localhost:{image_server}"
    try:
        fetched = await json_image(client, f"{base}/tongue.png")
        assert fetched.status_code == 200, fetched.text
        assert (fetched.json()["images"][0]["original_width"], fetched.json()["images"][0]["original_height"]) == (
            80,
            60,
        )
        assert (await json_image(client, f"{base}/redirect-on")).status_code == 200
        message = expect_error(await json_image(client, f"{base}/redirect-off"), 400, "image_url_not_allowed")
        assert "127.0.0.1" in message
        expect_error(await json_image(client, f"{base}/loop"), 400, "image_url_not_allowed")
        expect_error(await json_image(client, f"{base}/missing.png"), 400, "image_url_unreachable")
        expect_error(await json_image(client, f"{base}/huge.png"), 413, "image_too_large")
        expect_error(await upload(client, images.random_bytes(250_000)), 413, "image_too_large")
        three = {"image": [images.as_data_uri(images.png())] * 3}
        expect_error(await client.post(URL, json=three), 400, "too_many_images")
        big_form = await client.post(
            URL, files=[("image", (f"{i}.png", images.random_bytes(150_000))) for i in range(3)]
        )
        expect_error(big_form, 413, "request_too_large")
        assert (await upload(client, images.jpeg())).status_code == 200
    finally:
        await client.aclose()
        await manager.__aexit__(None, None, None)


async def test_disclaimer_can_be_turned_off(tiny_vl_dir, vl_settings):
    manager, client = await app_client(make_settings(tiny_vl_dir, medical_disclaimer=""))
    try:
        result = (await upload(client, images.jpeg())).json()
        assert result["disclaimer"] is None
        assert vl_settings.medical_disclaimer not in result["analysis"]
    finally:
        await client.aclose()
        await manager.__aexit__(None, None, None)
