"""The engine-dependent promises, checked on both engines through real servers: text, images, streams,
stop strings, seeds, aborts on disconnect, the bounded queue (429), REQUEST_TIMEOUT (504), errors, /health
and /metrics, and a clean exit (no engine process left behind).

Both servers serve the same `small` checkpoint (vLLM's CPU attention refuses the tiny one's head size), one
server per engine per test session. The vLLM one runs from `.venv-vllm` (scripts/bootstrap_vllm.sh; the
README's test command builds it): missing, its tests are skipped on a developer's machine and fail in CI.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import make_tiny_model
import openai
import pytest
from PIL import Image
from transformers import AutoTokenizer

from backend.engines.chat_prompt import ChatPromptRenderer
from backend.engines.requests import ChatTurn
from backend.media.resize import PixelBounds
from tests.conftest import ROOT
from tests.e2e.conftest import hold_request, running_server
from tests.helpers import missing

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
MAX_MODEL_LEN = 32768  # the checkpoint's whole range: long generations outlast the timeout
# One configuration serves every test: 4 running + 2 waiting fit, a 7th request is refused; a request that
# would generate thousands of tokens times out, the short answers of the other tests never do.
SETTINGS = {
    "MAX_MODEL_LEN": str(MAX_MODEL_LEN),
    "MAX_BATCH_SIZE": "4",
    "MAX_QUEUE": "2",
    "REQUEST_TIMEOUT_SECONDS": "4",
    "MAX_TOKENS_LIMIT": str(MAX_MODEL_LEN),
    "WARMUP": "true",  # as deployed: the engine warms up before /ping says ready (and its watchdog still runs)
}
VLLM_SETTINGS = {"ENFORCE_EAGER": "true", "CPU_KV_CACHE_GIB": "1"}  # starts in about a minute on 2 cores
# Far beyond what a CPU makes within the timeout (vLLM made 8,000 tokens of the small model in under 6 s).
LONG = {"max_tokens": 30000, "ignore_eos": True}
CHAT = "/v1/chat/completions"
BROKEN_IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}  # 3 bytes, no format


@pytest.fixture(scope="session")
def small_vl_dir(tmp_path_factory) -> Path:
    """The small Qwen2.5-VL checkpoint (head size 64), made by the project's own script."""
    out = tmp_path_factory.mktemp("models") / "small-vl"
    make_tiny_model.main(["--out", str(out), "--size", "small"])
    return out


@pytest.fixture(scope="session", params=["transformers", "vllm"])
def engine_server(request, small_vl_dir, tmp_path_factory):
    """A running server on each engine (one per session); after it stops, none of its processes is left."""
    python, extra = None, {}
    if request.param == "vllm":
        if not VLLM_PYTHON.exists():
            missing(f"{VLLM_PYTHON} is missing: run scripts/bootstrap_vllm.sh (scripts/test.sh does)")
        python, extra = str(VLLM_PYTHON), VLLM_SETTINGS
    options = {"python": python} if python else {}
    log_dir = tmp_path_factory.mktemp(f"server-{request.param}")
    with running_server(
        small_vl_dir, log_dir, load_timeout=280, ENGINE=request.param, **options, **SETTINGS, **extra
    ) as server:
        descendants = descendant_pids(server.process.pid)
        server.engine = request.param
        yield server
    assert server.process.returncode is not None
    deadline = time.monotonic() + 30
    while (alive := [pid for pid in descendants if pid_alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"processes left behind by the {request.param} server: {alive}"


@pytest.fixture(scope="session")
def renderer(small_vl_dir) -> ChatPromptRenderer:
    """The prompt code both engines use, to know the token counts they must report."""
    tokenizer = AutoTokenizer.from_pretrained(small_vl_dir)
    return ChatPromptRenderer(tokenizer, tokenizer.chat_template, image_token_id=151655)


def descendant_pids(pid: int) -> list[int]:
    """Children, grandchildren, ... of `pid` (vLLM's engine core and its worker), from /proc."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as children:
                    kids = [int(kid) for kid in children.read().split()]
            except OSError:
                continue
            found += kids
            pending += kids
    return found


def pid_alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def photo(width: int = 112, height: int = 84) -> tuple[Image.Image, str]:
    """A small photo, and its data URI."""
    image = Image.new("RGB", (width, height), (190, 90, 80))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return image, "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def health(server) -> dict:
    return httpx.get(f"{server.url}/health", timeout=10).json()


def wait_for_health(server, condition, what: str, timeout: float = 60) -> dict:
    """Poll /health until `condition(body)` holds."""
    deadline = time.monotonic() + timeout
    while not condition(body := health(server)):
        assert time.monotonic() < deadline, f"{what} did not happen: {body}"
        time.sleep(0.05)
    return body


def idle(body: dict) -> bool:
    """Nothing runs or waits, by our count and (on vLLM) by vLLM's own: every abort really landed."""
    scheduler = body["scheduler"]
    return scheduler["running"] + scheduler["waiting"] + scheduler.get("engine_unfinished", 0) == 0


def messages(text: str = "脾胃虚弱的人应该吃什么？") -> list[dict]:
    return [{"role": "user", "content": text}]


def test_health_says_which_engine_runs_and_its_capacity(engine_server):
    body = health(engine_server)
    assert body["status"] == "ready" and body["engine"] == engine_server.engine
    assert body["engine_reason"] == f"ENGINE={engine_server.engine}"
    assert body["max_model_len"] == MAX_MODEL_LEN and body["accepts_images"] is True
    if engine_server.engine == "vllm":
        # 1 GiB of KV cache at 512 bytes a token (2 layers x 1 KV head x 64 x K,V x 4 bytes in float32... or 2
        # in half precision): vLLM's own figure, whatever the dtype, is a whole number of blocks.
        kv = body["kv_cache"]
        assert kv["capacity_tokens"] == kv["blocks"] * kv["block_size"] > 100_000
        assert body["memory"]["engine_core_rss_bytes"] > 100 * 2**20


def test_text_answer_usage_and_seeds_with_the_openai_client(engine_server, renderer):
    client = openai.OpenAI(base_url=f"{engine_server.url}/v1", api_key="unused", max_retries=0)
    prompt_tokens = renderer.render([ChatTurn("user", [messages()[0]["content"]])], PixelBounds(3136, 151200))
    answers = [
        client.chat.completions.create(model="tiny", messages=messages(), max_tokens=12, seed=7, temperature=0.9)
        for _ in range(2)
    ]
    first = answers[0]
    assert first.choices[0].finish_reason == "length" and first.choices[0].message.content
    assert first.usage.completion_tokens == 12 and first.usage.prompt_tokens == prompt_tokens.prompt_tokens
    assert answers[1].choices[0].message.content == first.choices[0].message.content  # same seed, same text
    two = client.chat.completions.create(model="tiny", messages=messages(), max_tokens=12, n=2, seed=7, temperature=0.9)
    assert len(two.choices) == 2 and two.usage.completion_tokens == 24
    assert two.choices[0].message.content == first.choices[0].message.content  # choice 0 uses the seed itself


def test_an_image_costs_the_tokens_we_counted(engine_server, renderer):
    image, uri = photo()
    content = [{"type": "text", "text": "看看这个"}, {"type": "image_url", "image_url": {"url": uri}}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 4}
    answer = httpx.post(f"{engine_server.url}{CHAT}", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    expected = renderer.render([ChatTurn("user", ["看看这个", image])], PixelBounds(3136, 151200))
    assert expected.image_token_counts == [12]
    assert answer.json()["usage"]["prompt_tokens"] == expected.prompt_tokens
    # A request's narrower bounds: the image shrinks to one 28x28 block, and the engine uses that too.
    analysis = httpx.post(
        f"{engine_server.url}/v1/vision/analyze",
        files={"image": ("photo.png", base64.b64decode(uri.split(",")[1]), "image/png")},
        data={"question": "舌象如何？", "max_tokens": "4", "max_pixels": "1000"},
        timeout=60,
    )
    assert analysis.status_code == 200, analysis.text
    assert analysis.json()["images"][0]["image_tokens"] == 1
    assert health(engine_server)["scheduler"].get("prompt_count_mismatches", 0) == 0


def test_legacy_completions_with_the_openai_client(engine_server, small_vl_dir):
    """/v1/completions: a raw prompt with its control tokens, counted as the tokenizer counts it; streamed
    and whole alike; several prompts; refused image placeholders."""
    client = openai.OpenAI(base_url=f"{engine_server.url}/v1", api_key="unused", max_retries=0)
    prompt = "<|im_start|>user\n舌苔黄腻是什么意思？<|im_end|>\n<|im_start|>assistant\n"
    expected = len(AutoTokenizer.from_pretrained(small_vl_dir)(prompt, add_special_tokens=False)["input_ids"])
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    assert whole.usage.prompt_tokens == expected and whole.usage.completion_tokens == 8
    assert whole.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == whole.choices[0].text
    several = client.completions.create(model="tiny", prompt=[prompt, "中医"], max_tokens=2, n=2, seed=3)
    assert [choice.index for choice in several.choices] == [0, 1, 2, 3]
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny", prompt="<|image_pad|>", max_tokens=2)
    assert refused.value.body["code"] == "invalid_value"


def test_stream_and_whole_answer_agree_and_stop_strings_cut(engine_server):
    greedy = {"messages": messages(), "max_tokens": 24, "temperature": 0}
    whole = httpx.post(f"{engine_server.url}{CHAT}", json=greedy, timeout=60).json()
    text = whole["choices"][0]["message"]["content"]
    client = openai.OpenAI(base_url=f"{engine_server.url}/v1", api_key="unused", max_retries=0)
    chunks = list(
        client.chat.completions.create(model="tiny", stream=True, stream_options={"include_usage": True}, **greedy)
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == 24 == whole["usage"]["completion_tokens"]
    # A stop string from the middle of the greedy answer: the answer ends just before it.
    printable = [index for index, char in enumerate(text) if index >= 3 and char.isprintable() and char != "\ufffd"]
    cut = printable[len(printable) // 2]
    stopped = httpx.post(f"{engine_server.url}{CHAT}", json={**greedy, "stop": [text[cut : cut + 1]]}, timeout=60)
    choice = stopped.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == text[: text.index(text[cut])]


def test_a_disconnected_client_aborts_its_generation_in_the_engine(engine_server):
    before = health(engine_server)["generation"]["finished"]["abort"]
    body = {"messages": messages(), "stream": True, **LONG}
    with httpx.stream("POST", f"{engine_server.url}{CHAT}", json=body, timeout=60) as response:
        lines = response.iter_lines()
        content = [line for line, _ in zip((line for line in lines if '"content":"' in line), range(5))]
    assert len(content) == 5  # tokens were flowing when the client hung up
    after = wait_for_health(
        engine_server,
        lambda body: body["generation"]["finished"]["abort"] == before + 1 and idle(body),
        "the abort",
    )
    assert 0 < after["generation"]["last_aborted_tokens"] < LONG["max_tokens"]
    quick = httpx.post(f"{engine_server.url}{CHAT}", json={"messages": messages(), "max_tokens": 2}, timeout=60)
    assert quick.status_code == 200


def test_a_full_queue_answers_429_and_frees_when_clients_leave(engine_server):
    held: list[socket.socket] = []
    try:
        for _ in range(6):  # 4 running + 2 waiting
            held.append(hold_request(engine_server.url, CHAT, {"messages": messages(), "stream": True, **LONG}))
            time.sleep(0.05)
        wait_for_health(
            engine_server,
            lambda body: body["scheduler"]["running"] + body["scheduler"]["waiting"] == 6,
            "six requests in the engine",
        )
        refused = httpx.post(f"{engine_server.url}{CHAT}", json={"messages": messages(), "max_tokens": 2}, timeout=60)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
    finally:
        for connection in held:
            connection.close()
    wait_for_health(engine_server, idle, "the queue emptying")
    quick = httpx.post(f"{engine_server.url}{CHAT}", json={"messages": messages(), "max_tokens": 2}, timeout=60)
    assert quick.status_code == 200


def test_request_timeout_gives_504_and_frees_the_slot(engine_server):
    started = time.monotonic()
    response = httpx.post(f"{engine_server.url}{CHAT}", json={"messages": messages(), **LONG}, timeout=60)
    assert response.status_code == 504, response.text[:300]
    assert response.json()["error"]["code"] == "request_timeout" and 3.5 < time.monotonic() - started < 30
    wait_for_health(engine_server, idle, "the slot freeing")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"messages": messages(), "max_tokens": MAX_MODEL_LEN - 5}, 400, "context_length_exceeded"),
        ({"messages": messages(), "model": "gpt-4"}, 404, "model_not_found"),
        ({"messages": messages(), "n": 99}, 400, None),
        ({"messages": [{"role": "user", "content": [BROKEN_IMAGE]}]}, 400, "invalid_image"),
        ({"messages": messages("脾胃虚弱，" * 40000)}, 400, "context_length_exceeded"),
    ],
)
def test_bad_requests_get_the_same_envelope_on_every_engine(engine_server, body, status, code):
    response = httpx.post(f"{engine_server.url}{CHAT}", json=body, timeout=60)
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code


def test_metrics_keep_their_names(engine_server):
    httpx.post(f"{engine_server.url}{CHAT}", json={"messages": messages(), "max_tokens": 2}, timeout=60)
    text = httpx.get(f"{engine_server.url}/metrics", timeout=10).text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        'vllm:request_success_total{finished_reason="length",model_name="tiny"}',
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
        "shizhen:process_resident_memory_bytes",
    ):
        assert name in text, name


def test_zz_a_dead_engine_core_gives_503_and_says_so_in_health(engine_server):
    """Runs last on its server (it kills the engine; tests run in file order per engine): vLLM's engine core
    dying (the kernel's OOM killer, a crash) ends a running stream with an error event, turns into 503
    `engine_dead` for every request, /ping 503 and /health `error` with the reason.
    (The transformers engine runs in the server's own thread: tests/unit/test_engine_resilience.py.)"""
    if engine_server.engine != "vllm":
        pytest.skip("the transformers engine has no engine process to kill")
    body = {"messages": messages(), "stream": True, **LONG}
    with httpx.stream("POST", f"{engine_server.url}{CHAT}", json=body, timeout=30) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        for pid in descendant_pids(engine_server.process.pid):
            os.kill(pid, 9)
        rest = [line for line in lines if line.startswith("data: ")]  # ends: no hang
    assert rest[-1] == "data: [DONE]" and '"code":"engine_dead"' in rest[-2]
    body = wait_for_health(engine_server, lambda body: body["status"] == "error", "the error state", timeout=30)
    assert "engine core" in body["error"]
    response = httpx.post(f"{engine_server.url}{CHAT}", json={"messages": messages(), "max_tokens": 2}, timeout=30)
    assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead"
    ping = httpx.get(f"{engine_server.url}/ping", timeout=10)
    assert ping.status_code == 503 and ping.json()["error"]["code"] == "engine_dead"
    assert engine_server.process.poll() is None  # the server itself stays up to say what happened


def test_the_vllm_engine_drives_every_ending_of_a_request():
    """The vLLM engine against a stand-in for AsyncLLM that plays what a real engine core rarely does on cue
    (tests/e2e/vllm_engine_checks.py, run with .venv-vllm's Python and vLLM's own exception classes)."""
    if not VLLM_PYTHON.exists():
        missing(f"{VLLM_PYTHON} is missing: run scripts/bootstrap_vllm.sh (scripts/test.sh does)")
    script = Path(__file__).with_name("vllm_engine_checks.py")
    done = subprocess.run([str(VLLM_PYTHON), str(script)], capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, result in results.items():
        assert result["finals"] == 1 and result["in_flight"] == 0 and result["unfinished"] == 0, (name, result)
    assert (results["refused"]["status"], results["invalid"]["status"]) == (400, 400)  # inputs vLLM refuses
    assert results["error"]["status"] == 500  # vLLM's finish_reason "error" is no answer
    assert (results["eos"]["reason"], results["eos"]["tokens"]) == ("stop", 2)  # the end token is not counted
    assert (results["stopstring"]["reason"], results["stopstring"]["tokens"]) == ("stop", 2)
    assert results["slow"]["code"] == "request_timeout" and results["slow"]["aborted"] == ["slow-0"]
    assert results["cancelled"]["reason"] == "abort" and results["cancelled"]["aborted"] == ["cancelled-0"]
    assert results["early"]["reason"] == "abort" and results["early"]["tokens"] == 0
    assert results["dead"]["code"] == "engine_dead" and results["dead"]["state"] == "error"


def test_vllm_serves_a_folder_without_weights_with_load_format_dummy(small_vl_dir, tmp_path):
    """LOAD_FORMAT=dummy on vLLM (its own random initialisation): what scripts/gpu_proof.sh uses to measure the
    full-size architecture without its 64 GB of weights, here on the small one."""
    if not VLLM_PYTHON.exists():
        missing(f"{VLLM_PYTHON} is missing: run scripts/bootstrap_vllm.sh (scripts/test.sh does)")
    folder = tmp_path / "architecture-only"
    shutil.copytree(small_vl_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    settings = {"ENGINE": "vllm", "LOAD_FORMAT": "dummy", "MAX_MODEL_LEN": "4096", **VLLM_SETTINGS}
    with running_server(folder, tmp_path, python=str(VLLM_PYTHON), load_timeout=280, **settings) as server:
        body = {"messages": messages(), "max_tokens": 6, "ignore_eos": True}
        answer = httpx.post(f"{server.url}{CHAT}", json=body, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 6
        assert health(server)["engine"] == "vllm"
    assert "load_format=dummy" in server.log()  # vLLM's own engine configuration line says so
