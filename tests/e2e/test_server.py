"""End to end: the official `openai` client and curl against a real uvicorn process."""

import json
import subprocess

import openai
import pytest

from tests.conftest import data_uri
from tests.helpers import require_tool


@pytest.fixture(scope="module")
def client(server_url):
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def curl():
    """curl's path: skipped without it, but a failure under CI=true (.ci/run installs it)."""
    return require_tool("curl")


def test_openai_client_lists_the_model(client):
    assert [model.id for model in client.models.list()] == ["tiny"]


def test_openai_client_text_completion(client):
    completion = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "你是中医助手"}, {"role": "user", "content": "舌苔薄白是什么意思？"}],
        max_tokens=8,
        temperature=0,
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 8
    assert completion.choices[0].message.content


def test_openai_client_image_completion(client):
    completion = client.chat.completions.create(
        model="tiny",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "请分析这张舌象图片"},
                    {"type": "image_url", "image_url": {"url": data_uri(200, 150, "JPEG")}},
                ],
            }
        ],
        max_completion_tokens=6,
        temperature=0,
    )
    assert completion.usage.completion_tokens == 6
    text_only = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "请分析这张舌象图片"}], max_tokens=1
    )
    assert completion.usage.prompt_tokens > text_only.usage.prompt_tokens + 20


def test_openai_client_sees_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
    assert caught.value.body["param"] == "max_tokens"


def test_curl(server_url, curl):
    body = json.dumps({"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4, "temperature": 0})
    result = subprocess.run(
        [
            curl,
            "-sS",
            "-w",
            "\n%{http_code}",
            f"{server_url}/v1/chat/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    payload, status = result.stdout.rsplit("\n", 1)
    assert status == "200"
    assert json.loads(payload)["usage"]["completion_tokens"] == 4
    health = subprocess.run([curl, "-sS", f"{server_url}/health"], capture_output=True, text=True, timeout=30)
    assert json.loads(health.stdout)["status"] == "ready"


def test_curl_uploads_a_photo_to_vision_analyze(server_url, tmp_path, curl):
    from tests import images

    photo = tmp_path / "tongue.jpg"
    photo.write_bytes(images.jpeg(640, 480))
    result = subprocess.run(
        [
            curl,
            "-sS",
            "-F",
            f"image=@{photo}",
            "-F",
            "task=tongue",
            "-F",
            "max_tokens=8",
            f"{server_url}/v1/vision/analyze",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    body = json.loads(result.stdout)
    assert body["task"] == "tongue" and body["usage"]["completion_tokens"] <= 8
    assert body["images"][0]["width"] * body["images"][0]["height"] <= 360 * 420
    assert body["disclaimer"] and body["analysis"].endswith(body["disclaimer"])
