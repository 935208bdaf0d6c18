"""SIGTERM: the server stops accepting, lets running requests finish within SHUTDOWN_GRACE_SECONDS, exits.

The tests wait for what the server logs (uvicorn's shutdown steps), not for a guessed number of seconds.
"""

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
    # A grace far longer than the answer takes even on a busy machine (600 tokens: ~20 s on two loaded cores).
    with running_server(tiny_vl_dir, tmp_path, SHUTDOWN_GRACE_SECONDS="240") as server:
        thread, result = stream_in_background(server.url, 600)
        assert result["first"].wait(60)
        server.process.send_signal(signal.SIGTERM)
        # uvicorn logs this once it has closed its listening socket and is waiting for our stream to end.
        server.wait_for_log("Waiting for connections to close")
        try:
            refused = httpx.get(f"{server.url}/health", timeout=2).status_code
        except httpx.HTTPError:
            refused = "refused"
        still_streaming = thread.is_alive()
        thread.join(240)
        assert server.process.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once done
    assert refused in ("refused", 503)  # no new work once shutdown began
    assert still_streaming  # ... while the running answer was still being written
    assert "Finished server process" in server.log()
    assert result["error"] is None and result["lines"][-1] == "data: [DONE]"
    finish = json.loads(result["lines"][-2][6:])["choices"][0]["finish_reason"]
    assert finish == "length"  # the whole answer, not a cut one


LONG = 30_000  # minutes of work for the tiny model on a CPU: only an abort ends it within the test's limits


def test_after_the_grace_period_the_server_exits_anyway(tiny_vl_dir, tmp_path):
    with running_server(tiny_vl_dir, tmp_path, SHUTDOWN_GRACE_SECONDS="1", MAX_TOKENS_LIMIT="32000") as server:
        thread, result = stream_in_background(server.url, LONG)
        assert result["first"].wait(60)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        # The engine's shutdown joins the inference thread: the process ends only once the generation is
        # aborted (a generation that ran on would hold it for minutes).
        assert server.process.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once done
        assert time.monotonic() - started < 20
        thread.join(30)
    assert not thread.is_alive()
    log = server.log()
    assert "timeout graceful shutdown exceeded" in log and "Application shutdown complete." in log
    # The client was cut off mid-answer, and says so: no finish_reason, no [DONE], a broken stream.
    assert isinstance(result["error"], httpx.RemoteProtocolError), result["error"]
    assert result["lines"] and result["lines"][-1] != "data: [DONE]"
    assert not any('"finish_reason":"length"' in line for line in result["lines"])
    assert len(result["lines"]) < LONG
