"""`POST /v1/completions` over ASGI on the tiny model: raw prompts (text with control tokens, or ids), several
prompts and choices, echo, streaming, usage, and what is refused."""

import pytest
from transformers import AutoTokenizer

from tests.helpers import parse_sse

URL = "/v1/completions"
TEMPLATE = "<|im_start|>user\n舌苔黄腻是什么意思？<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer(tiny_vl_dir):
    return AutoTokenizer.from_pretrained(tiny_vl_dir)


def completion(prompt, **extra):
    return {"model": "tiny", "prompt": prompt, "temperature": 0, **extra}


async def test_a_raw_prompt_keeps_its_control_tokens_and_is_counted_exactly(client, tokenizer):
    response = await client.post(URL, json=completion(TEMPLATE, max_tokens=5))
    body = response.json()
    assert response.status_code == 200, body
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    # The client wrote the template: <|im_start|> is one control token, not its characters.
    expected = len(tokenizer(TEMPLATE, add_special_tokens=False)["input_ids"])
    assert expected < len(TEMPLATE) // 2
    assert body["usage"] == {"prompt_tokens": expected, "completion_tokens": 5, "total_tokens": expected + 5}


async def test_token_ids_and_text_give_the_same_greedy_completion(client, tokenizer):
    ids = tokenizer(TEMPLATE, add_special_tokens=False)["input_ids"]
    as_text = (await client.post(URL, json=completion(TEMPLATE, max_tokens=6))).json()
    as_ids = (await client.post(URL, json=completion(ids, max_tokens=6))).json()
    assert as_ids["choices"][0]["text"] == as_text["choices"][0]["text"]
    assert as_ids["usage"] == as_text["usage"]


async def test_several_prompts_with_n_choices_are_indexed_prompt_by_prompt(client):
    body = (await client.post(URL, json=completion([TEMPLATE, "中医"], max_tokens=3, n=2, seed=1))).json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["completion_tokens"] == 12


async def test_echo_repeats_the_prompt_before_the_completion(client, tokenizer):
    plain = (await client.post(URL, json=completion(TEMPLATE, max_tokens=4))).json()["choices"][0]["text"]
    echoed = (await client.post(URL, json=completion(TEMPLATE, max_tokens=4, echo=True))).json()
    assert echoed["choices"][0]["text"] == TEMPLATE + plain
    ids = tokenizer("中医", add_special_tokens=False)["input_ids"]
    from_ids = (await client.post(URL, json=completion(ids, max_tokens=1, echo=True))).json()
    assert from_ids["choices"][0]["text"].startswith("中医")


async def test_the_default_is_16_tokens_as_openai(client):
    body = (await client.post(URL, json={"prompt": "中医", "ignore_eos": True})).json()
    assert body["usage"]["completion_tokens"] == 16


async def test_a_stream_matches_the_whole_answer(client):
    whole = (await client.post(URL, json=completion(TEMPLATE, max_tokens=8))).json()
    response = await client.post(
        URL, json=completion(TEMPLATE, max_tokens=8, stream=True, stream_options={"include_usage": True})
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]"
    chunks = [event for event in events[:-1] if event["choices"]]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"] == whole["usage"]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (completion("<|image_pad|>描述"), "prompt", "invalid_value"),
        (completion([10**9]), "prompt", "invalid_value"),
        (completion([]), "prompt", "invalid_value"),
        (completion("hi", logprobs=2), "logprobs", "unsupported_field"),
        (completion("hi", suffix="x"), "suffix", "unsupported_field"),
        (completion("hi", max_tokens=40000), "max_tokens", "max_tokens_too_large"),
        (completion("舌" * 40000, max_tokens=1), "prompt", "context_length_exceeded"),
        (completion("舌苔 " * 70000, max_tokens=1), "prompt", "context_length_exceeded"),  # refused untokenised
        (completion(["a"] * 17), "prompt", None),
        (completion("hi", stream_options={"include_usage": True}), "stream_options", "invalid_value"),
        ({"prompt": 5}, "prompt", None),
        ({"prompt": "hi", "model": "gpt-3.5-turbo-instruct"}, "model", "model_not_found"),
    ],
)
async def test_what_cannot_be_served_is_a_400_envelope(client, body, param, code):
    response = await client.post(URL, json=body)
    error = response.json()["error"]
    assert response.status_code in (400, 404), error
    assert error["param"] == param and set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
