"""SIGTERM: the server stops accepting, lets running requests finish within SHUTDOWN_GRACE_SECONDS, exits."""

import json
import signal
import threading
import time

import httpx

from tests.e2e.conftest import running_server

MESSAGES = [{"role": "user", "content": "你好"}]


def stream_in_background(url, max_tokens):
    """Start a streamed request; return (thread, result dict filled with its lines and any error)."""
    result = {"lines": [], "error": None, "first": threading.Event()}

    def run():
        body = {"messages": MESSAGES, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line:
                        result["lines"].append(line)
                        result["first"].set()
        except httpx.HTTPError as exc:
            result["error"] = exc
        result["first"].set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_sigterm_lets_a_running_answer_finish(tiny_vl_dir, tmp_path):
    with running_server(tiny_vl_dir, tmp_path, SHUTDOWN_GRACE_SECONDS="60") as server:
        thread, result = stream_in_background(server.url, 1500)
        assert result["first"].wait(60)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:
            refused = httpx.get(f"{server.url}/health", timeout=2).status_code
        except httpx.HTTPError:
            refused = "refused"
        thread.join(120)
        assert server.process.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once done
    assert refused in ("refused", 503)  # no new work once shutdown began
    assert "Finished server process" in server.log()
    assert result["error"] is None and result["lines"][-1] == "data: [DONE]"
    finish = json.loads(result["lines"][-2][6:])["choices"][0]["finish_reason"]
    assert finish == "length"  # the whole answer, not a cut one


def test_after_the_grace_period_the_server_exits_anyway(tiny_vl_dir, tmp_path):
    with running_server(tiny_vl_dir, tmp_path, SHUTDOWN_GRACE_SECONDS="1") as server:
        thread, result = stream_in_background(server.url, 8000)
        assert result["first"].wait(60)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once done
        assert time.monotonic() - started < 20  # not the minute 8000 tokens would take
        thread.join(30)
    assert not thread.is_alive()
