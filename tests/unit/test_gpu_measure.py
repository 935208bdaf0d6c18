"""scripts/gpu_measure.py's measuring part without a GPU: its requests and their parsing against a stub
OpenAI server started here, the GPU memory read from a stand-in nvidia-smi, and the summary it writes."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import gpu_measure
import gpu_summary
import pytest
from PIL import Image

IMAGE_TOKENS = 195  # what Qwen2.5-VL makes of a 360x420 image


class StubServer:
    """An OpenAI-style chat endpoint that counts prompt tokens as 20 + 7 per CONTEXT_UNIT (+ an image), and
    streams exactly max_tokens one-token chunks after a role-only chunk and a keep-alive comment."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet test output
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.bodies.append(body)
                content = body["messages"][0]["content"]
                parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
                text = "".join(part.get("text", "") for part in parts)
                has_image = any(part["type"] == "image_url" for part in parts)
                prompt = 20 + 7 * text.count(gpu_measure.CONTEXT_UNIT) + IMAGE_TOKENS * has_image
                usage = {"prompt_tokens": prompt, "completion_tokens": body["max_tokens"]}
                if not body.get("stream"):
                    self.reply(200, "application/json", json.dumps({"choices": [], "usage": usage}).encode())
                    return
                events = [": keep-alive", 'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}']
                events += ['data: {"choices":[{"index":0,"delta":{"content":"舌"}}]}'] * body["max_tokens"]
                events += ["data: " + json.dumps({"choices": [], "usage": usage}), "data: [DONE]"]
                self.reply(200, "text/event-stream", "".join(event + "\n\n" for event in events).encode())

            def reply(self, status: int, kind: str, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    server = StubServer()
    yield server
    server.close()


@pytest.fixture
def two_gpus(tmp_path, monkeypatch):
    """A stand-in nvidia-smi on PATH: two GPUs whose memory.used grows by 1 GiB with each reading."""
    tool = tmp_path / "nvidia-smi"
    counter = tmp_path / "readings"
    tool.write_text(
        "#!/usr/bin/env bash\n"
        f'n=$(( $(cat {counter} 2>/dev/null || echo 0) + 1 )); echo "$n" >{counter}\n'
        'echo "$((40000 + n * 1024))"; echo "$((30000 + n * 1024))"\n'
    )
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    return counter


def test_the_stream_is_read_as_it_arrives():
    times = iter([1.25, 2.0])
    lines = [
        ": keep-alive",
        "",
        'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}',  # the role alone: not the first token
        'data: {"choices":[{"delta":{"content":"a"}}]}',
        'data: {"choices":[{"delta":{"content":"b"}}]}',
        'data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":2}}',
        "data: [DONE]",
    ]
    answer = gpu_measure.read_stream(lines, started=1.0, clock=lambda: next(times))
    assert answer == gpu_measure.Answer(1.0, 0.25, 2, 12, 2)
    assert answer.decode_tokens_per_s == pytest.approx(1 / 0.75)
    with pytest.raises(gpu_measure.MeasureError, match="error event in the stream: .*overloaded"):
        gpu_measure.read_stream(['data: {"error":{"message":"overloaded"}}'], started=0.0)
    assert gpu_measure.Answer(1.0, None, 0, 5, 0).decode_tokens_per_s is None


def test_requests_are_exact_length_streams_with_a_360_by_420_image():
    image = gpu_measure.image_data_uri()
    assert Image.open(io.BytesIO(base64.b64decode(image.split(",", 1)[1]))).size == (360, 420)
    body = gpu_measure.chat_body("m", "question", image)
    assert body["ignore_eos"] is True and body["max_tokens"] == 100 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["temperature"] == 0
    assert [part["type"] for part in body["messages"][0]["content"]] == ["image_url", "text"]
    plain = gpu_measure.chat_body("m", "question", max_tokens=1, stream=False)
    assert plain["messages"][0]["content"] == "question" and "stream_options" not in plain


def test_measure_against_a_stub_server(stub, two_gpus):
    result = gpu_measure.measure(stub.url, "full-vl", context_tokens=2048, answer_tokens=100, repeats=2)
    assert result["errors"] == []
    long = result["long_request"]
    # The context is sized with the server's own counts: 20 + 7 per unit, so 290 units make 2050 tokens.
    assert long["text_prompt_tokens"] == 2050 and long["prompt_tokens"] == 2050 + IMAGE_TOKENS
    assert long["completion_tokens"] == 100 and long["content_chunks"] == 100
    assert 0 < long["ttft_s"] <= long["latency_s"]
    # Peak memory: the largest reading of both GPUs during the request (the stand-in grows at each reading).
    readings = int(two_gpus.read_text())
    assert long["peak_memory_mib"] == [40000 + readings * 1024, 30000 + readings * 1024]
    assert long["peak_memory_total_mib"] == sum(long["peak_memory_mib"])

    for kind, with_image in (("text_answer", False), ("image_answer", True)):
        part = result[kind]
        assert len(part["runs"]) == 2 and part["completion_tokens"] == [100, 100]
        assert all(run["ttft_s"] is not None and run["decode_tokens_per_s"] > 0 for run in part["runs"])
        assert part["ttft_s"] <= part["latency_s"]
    streamed = [body for body in stub.bodies if body["stream"]]
    assert len(streamed) == 5 and all(body["ignore_eos"] and body["max_tokens"] == 100 for body in streamed)
    with_images = [body for body in streamed if isinstance(body["messages"][0]["content"], list)]
    assert len(with_images) == 3  # the long request and the two image answers


def test_a_failing_stage_is_recorded_and_the_others_still_run(stub, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no nvidia-smi: memory is simply not known
    assert gpu_measure.gpu_memory_mib() == []
    real = gpu_measure.stream_answer
    calls = iter(range(100))

    def flaky(client, body):
        if next(calls) == 0:
            raise gpu_measure.MeasureError("HTTP 400: prompt too long")
        return real(client, body)

    monkeypatch.setattr(gpu_measure, "stream_answer", flaky)
    result = gpu_measure.measure(stub.url, "m", context_tokens=100, answer_tokens=5, repeats=1)
    assert result["errors"] == ["long_request: MeasureError: HTTP 400: prompt too long"]
    assert "long_request" not in result and result["text_answer"]["completion_tokens"] == [5]


def test_the_summary_puts_the_engines_side_by_side(stub, two_gpus):
    measured = gpu_measure.measure(stub.url, "m", context_tokens=300, answer_tokens=10, repeats=1)
    level = {"concurrency": 8, "requests_per_second": 3.5, "tokens_per_second": 224.0, "latency_p50": 2.1,
             "latency_p95": 2.9, "ttft_p50": 0.2, "ttft_p95": 0.4, "errors": 0}
    vllm = {**measured, "versions": {"vllm": "0.33.0"}, "load_seconds": 95.2, "memory_after_load_mib": [130000],
            "peak_memory_while_loading_mib": [131000], "bench": [level], "settings": {"MAX_MODEL_LEN": "4096"}}
    failed = {"versions": {"torch": "2.13.0"}, "errors": ["health: MeasureError: the model failed to load: OOM"]}
    text = gpu_summary.summary_markdown({"transformers": failed, "vllm": vllm}, "GPU 0: NVIDIA H200")
    assert "| measured | transformers | vllm |" in text and "GPU 0: NVIDIA H200" in text
    assert "| GPU memory after load | - | 130,000 MiB |" in text
    assert "| vllm | 8 | 3.50 | 224.0 | 2.100 s | 2.900 s | 0.200 s | 0.400 s | 0 |" in text
    assert "- transformers: health: MeasureError: the model failed to load: OOM" in text
    assert "MAX_MODEL_LEN=4096" in text
    assert "| answer tokens (each run) | - | [10] / [10] |" in text
    assert "(1,024 + 2,048)" in gpu_summary.mib([1024, 2048]) and gpu_summary.mib([]) == "-"
