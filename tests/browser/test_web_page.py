"""The web chat page in real headless Chromium against a real server with the tiny model.

The error messages are those of real servers configured to give each answer (413, 429, 503, no server).
Without Chromium or Playwright the tests are skipped, and fail under CI=true (.ci/run installs Chromium).
Screenshots land in test-artifacts/ (desktop and phone sizes) to be looked at.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests import images
from tests.conftest import ROOT
from tests.e2e.conftest import hold_request, running_server
from tests.helpers import access_log_statuses, require_module, require_tool

try:
    from playwright import sync_api
except ImportError:  # the browser fixture skips every test (fails them under CI)
    sync_api = None
ARTIFACTS = ROOT / "test-artifacts"
DISCLAIMER_START = "提示：以上内容由AI生成"


@pytest.fixture(scope="module")
def browser():
    require_module("playwright.sync_api")
    chromium = require_tool("chromium", "chromium-browser")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
            ],
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def server(tiny_vl_dir, tmp_path_factory):
    with running_server(tiny_vl_dir, tmp_path_factory.mktemp("web"), DEFAULT_MAX_TOKENS="40") as running:
        yield running


def open_page(browser, url, width=1200, height=800, status="ready"):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(url)
    page.wait_for_selector(f"#status-dot.{status}", timeout=30_000)
    return page


def ask(page, text):
    page.fill("#prompt", text)
    page.keyboard.press("Enter")


def stats(server):
    return httpx.get(f"{server.url}/health", timeout=10).json()["generation"]


def test_a_question_gets_a_streamed_answer(browser, server):
    page = open_page(browser, server.url + "/")
    assert page.inner_text("#model-name") == "tiny"
    before = stats(server)
    with page.expect_response("**/v1/chat/completions") as answer:
        ask(page, "舌苔黄腻是什么意思？")
    assert answer.value.headers["content-type"].startswith("text/event-stream")
    page.wait_for_selector(".msg.assistant[data-done=complete]", timeout=60_000)
    assert page.inner_text(".msg.user") == "舌苔黄腻是什么意思？"
    assert page.inner_text(".msg.assistant .body").strip()
    after = stats(server)
    assert sum(after["finished"].values()) == sum(before["finished"].values()) + 1
    ask(page, "再详细一点")  # a second turn carries the history
    page.wait_for_selector(".msg.assistant[data-done=complete] >> nth=1", timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "chat-desktop.png"), full_page=True)
    assert page.errors == []
    page.close()


def test_an_image_with_the_tongue_preset_gets_an_analysis(browser, server, tmp_path):
    photo = tmp_path / "tongue.jpg"
    photo.write_bytes(images.jpeg(640, 480))
    page = open_page(browser, server.url + "/")
    page.set_input_files("#file-input", [str(photo), str(photo)])
    expect = sync_api.expect
    expect(page.locator(".preview")).to_have_count(2)  # read asynchronously, then shown
    page.click(".preview button >> nth=0")  # remove one
    expect(page.locator(".preview")).to_have_count(1)
    page.click("button[data-task=tongue]")
    assert page.get_attribute("button[data-task=tongue]", "aria-pressed") == "true"
    with page.expect_request("**/v1/vision/analyze"):
        page.click("#send")
    page.wait_for_selector(".msg.assistant[data-done=complete]", timeout=60_000)
    assert DISCLAIMER_START in page.inner_text(".msg.assistant .body")
    assert page.locator(".msg.user img").count() == 1
    page.screenshot(path=str(ARTIFACTS / "analysis-desktop.png"), full_page=True)
    page.close()


def test_stop_aborts_the_generation_on_the_server(browser, server):
    page = open_page(browser, server.url + "/")

    def long_answer(route):
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "max_tokens": 6000, "ignore_eos": True}))

    page.route("**/v1/chat/completions", long_answer)
    aborted_before = stats(server)["finished"]["abort"]
    ask(page, "请详细介绍中医的舌诊")
    page.wait_for_function("document.querySelector('.msg.assistant .body')?.textContent.length > 20", timeout=60_000)
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-done=stopped]", timeout=30_000)
    assert page.is_visible("#send") and not page.is_visible("#stop")
    for _ in range(100):
        after = stats(server)
        if after["finished"]["abort"] > aborted_before:
            break
        page.wait_for_timeout(100)
    assert after["finished"]["abort"] == aborted_before + 1
    assert 0 < after["last_aborted_tokens"] < 6000
    page.close()


def test_an_answer_with_html_is_shown_as_text(browser, server):
    page = open_page(browser, server.url + "/")
    hostile = '<img src=x onerror="window.__xss=1"> **粗体** <script>window.__xss=2</script>\n- 一\n- 二'
    chunks = [hostile[:10], hostile[10:25], hostile[25:]]
    sse = (
        "".join(
            "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": piece}}]}, ensure_ascii=False) + "\n\n"
            for piece in chunks
        )
        + "data: [DONE]\n\n"
    )
    page.route(
        "**/v1/chat/completions", lambda route: route.fulfill(status=200, body=sse, content_type="text/event-stream")
    )
    ask(page, "hi")
    page.wait_for_selector(".msg.assistant[data-done=complete]", timeout=30_000)
    body = page.locator(".msg.assistant .body")
    assert body.locator("img, script").count() == 0
    assert '<img src=x onerror="window.__xss=1">' in body.inner_text()
    assert body.locator("strong").inner_text() == "粗体" and body.locator("li").count() == 2
    assert page.evaluate("window.__xss") is None
    page.close()


def test_a_wrong_api_key_shows_the_error_and_a_right_one_works(browser, tiny_vl_dir, tmp_path):
    with running_server(tiny_vl_dir, tmp_path, API_KEY="sk-right-key", DEFAULT_MAX_TOKENS="8") as keyed:
        page = open_page(browser, keyed.url + "/")
        ask(page, "你好")
        page.wait_for_selector("#error:not([hidden])", timeout=30_000)
        assert "API" in page.inner_text("#error") and page.is_visible("#key-panel")
        assert page.input_value("#prompt") == "你好"  # the question is back, to send again
        assert page.locator(".msg").count() == 0
        page.fill("#key-input", "sk-wrong-key")
        page.click("#key-save")
        ask(page, "你好")
        page.wait_for_selector("#error:not([hidden])", timeout=30_000)
        assert "API" in page.inner_text("#error")
        page.screenshot(path=str(ARTIFACTS / "wrong-key.png"))
        page.fill("#key-input", "sk-right-key")
        page.click("#key-save")
        ask(page, "你好")
        page.wait_for_selector(".msg.assistant[data-done=complete]", timeout=60_000)
        assert page.is_hidden("#error")
        assert page.evaluate("localStorage.getItem('shizhen.apiKey')") == "sk-right-key"
        page.close()


def test_english_toggle_and_phone_layout(browser, server):
    page = open_page(browser, server.url + "/", width=390, height=844)
    assert page.inner_text("#send") == "发送"
    page.click("#lang-button")
    assert page.inner_text("#send") == "Send"
    # The status line is rewritten once the page has asked /health again: wait for it, do not race it.
    sync_api.expect(page.locator("#status-text")).to_have_text("Ready")
    ask(page, "What is a tongue coating?")
    page.wait_for_selector(".msg.assistant[data-done=complete]", timeout=60_000)
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 390  # nothing wider than the phone
    page.screenshot(path=str(ARTIFACTS / "chat-phone.png"))
    page.close()


def ask_and_expect_an_error(page, status, expected, screenshot):
    """Ask; the real server answers `status` (None: no answer at all) and the page explains it."""
    event = "requestfinished" if status is not None else "requestfailed"
    with page.expect_event(event, lambda request: request.url.endswith("/v1/chat/completions")) as finished:
        ask(page, "你好")
    request = finished.value
    if status is not None:
        assert request.response().status == status
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / screenshot))
    assert expected in page.inner_text("#error"), page.inner_text("#error")
    assert page.input_value("#prompt") == "你好"  # the question is back, to send again
    assert page.locator(".msg").count() == 0
    assert page.errors == []


def test_a_request_over_max_request_bytes_shows_too_large(browser, tiny_vl_dir, tmp_path):
    with running_server(tiny_vl_dir, tmp_path, MAX_REQUEST_BYTES="40") as small:
        page = open_page(browser, small.url + "/")
        ask_and_expect_an_error(page, 413, "图片或请求太大", "error-413.png")
        page.close()
        assert 413 in access_log_statuses(small.log())


def wait_for_scheduler(page, server, **expected):
    """Wait until the server's /health reports the scheduler state `expected` (running=1, waiting=1, ...)."""
    for _ in range(600):
        scheduler = httpx.get(f"{server.url}/health", timeout=10).json()["scheduler"]
        if all(scheduler[key] == value for key, value in expected.items()):
            return
        page.wait_for_timeout(50)
    raise AssertionError(f"the scheduler never reached {expected}: {scheduler}")


def test_a_full_queue_shows_busy_with_the_servers_retry_after(browser, tiny_vl_dir, tmp_path):
    settings = {"MAX_BATCH_SIZE": "1", "MAX_QUEUE": "1", "MAX_TOKENS_LIMIT": "32000", "SHUTDOWN_GRACE_SECONDS": "1"}
    with running_server(tiny_vl_dir, tmp_path, **settings) as busy:
        page = open_page(browser, busy.url + "/")
        # One request runs and one waits, from clients that hang up at the end: the page's is one too many.
        # The second is sent once the first runs (sent together, the second could find the first still
        # queued, and be refused itself).
        long = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 30000, "ignore_eos": True}
        with hold_request(busy.url, "/v1/chat/completions", long):
            wait_for_scheduler(page, busy, running=1, waiting=0)
            with hold_request(busy.url, "/v1/chat/completions", long):
                wait_for_scheduler(page, busy, running=1, waiting=1)
                # The server's Retry-After for one running sequence is 1 s
                # (backend/engines/transformers_engine/scheduler.py).
                ask_and_expect_an_error(page, 429, "请 1 秒后重试", "error-429.png")
        page.close()
        assert 429 in access_log_statuses(busy.log())


@pytest.fixture(scope="module")
def failed_server(tmp_path_factory):
    """A server whose model failed to load: an empty folder as MODEL_ID has no config.json."""
    broken = tmp_path_factory.mktemp("broken-model")
    with running_server(broken, tmp_path_factory.mktemp("failed"), wait_for="error") as running:
        yield running


def test_a_model_that_failed_to_load_shows_unavailable(browser, failed_server):
    page = open_page(browser, failed_server.url + "/", status="error")
    assert page.inner_text("#status-text") == "加载失败"
    ask_and_expect_an_error(page, 503, "模型暂不可用", "error-503.png")
    page.close()
    assert 503 in access_log_statuses(failed_server.log())


def test_the_failed_status_is_a_round_dot_beside_one_line_of_text(browser, failed_server):
    page = open_page(browser, failed_server.url + "/", status="error")
    dot = page.locator("#status-dot").bounding_box()
    text = page.locator("#status-text").bounding_box()
    page.close()
    assert abs(dot["width"] - dot["height"]) < 1, dot
    assert text["height"] < 2 * dot["height"] + 10, text  # one line, not a character per line


def test_a_server_that_went_away_shows_a_network_error(browser, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()  # the quickest server to start: it has no model to load
    with running_server(broken, tmp_path, wait_for="error") as gone:
        page = open_page(browser, gone.url + "/", status="error")
        gone.process.terminate()
        assert gone.process.wait(30) is not None
        ask_and_expect_an_error(page, None, "网络错误", "error-network.png")
        page.close()


def test_images_can_be_dropped_and_pasted(browser, server):
    page = open_page(browser, server.url + "/")
    make_file = """async (name) => {
        const canvas = document.createElement('canvas'); canvas.width = 40; canvas.height = 30;
        canvas.getContext('2d').fillRect(0, 0, 40, 30);
        const blob = await new Promise((resolve) => canvas.toBlob(resolve, 'image/png'));
        const data = new DataTransfer(); data.items.add(new File([blob], name, {type: 'image/png'}));
        return data;
    }"""
    dropped = page.evaluate_handle(make_file, "dropped.png")
    page.dispatch_event("#composer", "drop", {"dataTransfer": dropped})
    sync_api.expect(page.locator(".preview")).to_have_count(1)
    page.evaluate(
        f"""async () => {{
            const data = await ({make_file})('pasted.png');
            document.getElementById('prompt').dispatchEvent(new ClipboardEvent('paste', {{clipboardData: data, bubbles: true}}));
        }}"""
    )
    sync_api.expect(page.locator(".preview")).to_have_count(2)
    assert page.get_attribute(".preview >> nth=1 >> img", "alt") == "pasted.png"
    page.close()
