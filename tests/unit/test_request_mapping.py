"""From an API request to the sampling of each choice: `resolve_sampling`, `resolve_max_new_tokens`, and the
checkpoint's own generation defaults as `load_model` reads them from `generation_config.json`.

The rule: a value the request sets wins (even a falsy one such as temperature 0), else the checkpoint's
`generation_config.json`, else OpenAI's defaults (temperature 1, top_p 1, no top-k, no penalty).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.engines.transformers_engine.engine import TransformersEngine
from backend.engines.transformers_engine.loader import GenerationDefaults, load_model
from backend.errors import InvalidRequestError
from backend.handlers.chat import ChatCompletionHandler, resolve_max_new_tokens, resolve_sampling
from backend.media import ImageIntake
from backend.protocol.chat import ChatCompletionRequest
from backend.settings import Settings
from tests.conftest import make_settings

CHECKPOINT = GenerationDefaults(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
NONE = GenerationDefaults()
MESSAGES = [{"role": "user", "content": "舌质淡红，这是什么体质？"}]


def request(**fields) -> ChatCompletionRequest:
    """A validated chat request (so the fields are exactly what a client can send)."""
    return ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields})


def settings(**overrides) -> Settings:
    return Settings(_env_file=None, **overrides)


# --- resolve_sampling ---


def test_request_values_win_over_the_checkpoint():
    params = resolve_sampling(
        request(temperature=0.3, top_p=0.5, top_k=5, repetition_penalty=1.2), CHECKPOINT, max_new_tokens=9
    )
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.3, 0.5, 5, 1.2)
    assert params.max_new_tokens == 9


def test_falsy_request_values_still_win():
    """temperature 0 and top_k 0 are choices (greedy, no top-k), not "unset": the checkpoint's 0.7 and 20
    must not replace them."""
    params = resolve_sampling(request(temperature=0, top_k=0), CHECKPOINT, 9)
    assert params.temperature == 0.0 and params.greedy
    assert params.top_k == 0


def test_the_checkpoint_fills_what_the_request_leaves_out():
    params = resolve_sampling(request(temperature=1.5), CHECKPOINT, 9)
    assert params.temperature == 1.5
    assert (params.top_p, params.top_k, params.repetition_penalty) == (0.8, 20, 1.05)


def test_openai_defaults_when_neither_sets_a_value():
    params = resolve_sampling(request(), NONE, 9)
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (1.0, 1.0, 0, 0.0)
    assert (params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (1.0, 0.0, 0.0)
    assert params.seed is None and params.stop == () and not params.ignore_eos


def test_fields_without_a_checkpoint_default_come_from_the_request():
    params = resolve_sampling(
        request(min_p=0.1, presence_penalty=0.5, frequency_penalty=-0.25, stop=["###", "", "END"], ignore_eos=True),
        CHECKPOINT,
        9,
    )
    assert (params.min_p, params.presence_penalty, params.frequency_penalty) == (0.1, 0.5, -0.25)
    assert params.stop == ("###", "END")  # empty stop strings are dropped
    assert params.ignore_eos


@pytest.mark.parametrize("defaults", [CHECKPOINT, NONE], ids=["checkpoint top_k 20", "no default"])
def test_top_k_minus_one_turns_top_k_off(defaults):
    """-1 is vLLM's "off": it becomes 0 (no cut), even over a checkpoint default of 20."""
    assert resolve_sampling(request(top_k=-1), defaults, 9).top_k == 0


def test_each_choice_gets_seed_plus_its_index():
    """n seeded choices differ (seed, seed+1, ...) yet each is reproducible; unseeded ones stay unseeded."""
    seeded = request(seed=41, n=3)
    assert [resolve_sampling(seeded, CHECKPOINT, 9, index).seed for index in range(3)] == [41, 42, 43]
    assert [resolve_sampling(request(n=3), CHECKPOINT, 9, index).seed for index in range(3)] == [None] * 3
    assert resolve_sampling(request(seed=0), CHECKPOINT, 9).seed == 0  # seed 0 is a seed


# --- resolve_max_new_tokens ---


def test_max_completion_tokens_wins_over_max_tokens():
    both = request(max_tokens=50, max_completion_tokens=7)
    assert both.requested_max_tokens == 7
    assert resolve_max_new_tokens(both.requested_max_tokens, 10, 100, settings()) == 7
    assert request(max_tokens=50).requested_max_tokens == 50


def test_no_max_tokens_means_the_default_within_the_context_left():
    server = settings(default_max_tokens=64)
    assert resolve_max_new_tokens(None, 10, 1000, server) == 64
    assert resolve_max_new_tokens(None, 990, 1000, server) == 10  # only 10 tokens of context are left
    assert resolve_max_new_tokens(30, 970, 1000, server) == 30  # exactly the room left is allowed


@pytest.mark.parametrize(
    ("requested", "prompt_tokens", "asked_total"),
    [(31, 970, 1001), (None, 1000, 1001), (None, 1200, 1201)],
    ids=["answer past the end", "prompt fills the context", "prompt past the end"],
)
def test_the_context_length_error(requested, prompt_tokens, asked_total):
    """OpenAI's wording and code, with the numbers the client needs to shorten its request."""
    with pytest.raises(InvalidRequestError) as caught:
        resolve_max_new_tokens(requested, prompt_tokens, 1000, settings())
    error = caught.value
    assert error.status_code == 400 and error.code == "context_length_exceeded" and error.param == "messages"
    assert "maximum context length is 1000 tokens" in error.message
    assert f"you requested {asked_total} tokens ({prompt_tokens} in the messages" in error.message


def test_max_tokens_above_the_server_limit_is_refused_before_the_context_check():
    with pytest.raises(InvalidRequestError) as caught:
        resolve_max_new_tokens(5000, 10, 100, settings(max_tokens_limit=4096))
    assert caught.value.code == "max_tokens_too_large" and "4096" in caught.value.message


# --- the checkpoint's generation_config.json, as load_model reads it ---


def copy_checkpoint(source: Path, target: Path, generation_config: dict | None) -> Path:
    """A checkpoint folder sharing `source`'s files (symlinks), with its own generation_config.json (or none)."""
    target.mkdir()
    for path in source.iterdir():
        if path.name != "generation_config.json":
            (target / path.name).symlink_to(path)
    if generation_config is not None:
        (target / "generation_config.json").write_text(json.dumps(generation_config))
    return target


def test_the_tiny_checkpoint_generation_config_becomes_the_defaults(vl, tiny_vl_dir):
    """`do_sample: true` with its values: exactly what generation_config.json says."""
    written = json.loads((tiny_vl_dir / "generation_config.json").read_text())
    assert written["do_sample"] is True
    assert vl.generation_defaults == GenerationDefaults(
        temperature=written["temperature"],
        top_p=written["top_p"],
        top_k=written["top_k"],
        repetition_penalty=written["repetition_penalty"],
    )


def test_do_sample_false_means_greedy_with_the_checkpoint_repetition_penalty(tiny_vl_dir, tmp_path):
    """A checkpoint that generates greedily by default: temperature 0, its repetition penalty, and its
    (unused) sampling values are not carried over."""
    written = json.loads((tiny_vl_dir / "generation_config.json").read_text())
    config = {**written, "do_sample": False, "repetition_penalty": 1.1}
    greedy = copy_checkpoint(tiny_vl_dir, tmp_path / "greedy", config)
    defaults = load_model(make_settings(greedy)).generation_defaults
    assert defaults == GenerationDefaults(temperature=0.0, repetition_penalty=1.1)
    params = resolve_sampling(request(), defaults, 9)
    assert params.greedy and params.repetition_penalty == 1.1 and (params.top_p, params.top_k) == (1.0, 0)


def test_a_checkpoint_without_generation_config_uses_openai_defaults(tiny_vl_dir, tmp_path):
    """No generation_config.json: the checkpoint chose nothing, so requests fall back to OpenAI's defaults.
    (transformers still gives the model a default GenerationConfig with `do_sample: false`; read as the
    authors' choice it would make every request without a temperature greedy.)"""
    bare = copy_checkpoint(tiny_vl_dir, tmp_path / "bare", None)
    defaults = load_model(make_settings(bare)).generation_defaults
    params = resolve_sampling(request(), defaults, 9)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (1.0, 1.0, 0, 1.0)


# --- the whole mapping inside the handler, over the loaded tiny model ---


@pytest.fixture
async def handler_for(tiny_vl_dir):
    """Make a chat handler over a freshly loaded engine with the given settings; shut down afterwards."""
    engines: list[TransformersEngine] = []

    async def make(**overrides) -> ChatCompletionHandler:
        server = make_settings(tiny_vl_dir, **overrides)
        engine = TransformersEngine(server)
        engines.append(engine)
        await engine.start()
        await engine.wait_until_loaded()
        assert engine.state == "ready", engine.error
        return ChatCompletionHandler(engine, server, ImageIntake(server))

    yield make
    for engine in engines:
        await engine.shutdown()


async def test_the_handler_combines_request_checkpoint_and_choice_index(handler_for):
    """What `prepare` hands the scheduler: per choice, the request's values, the tiny checkpoint's
    generation_config.json for the rest, seed + index, top_k -1 -> 0, and max_completion_tokens."""
    handler = await handler_for()
    prepared = await handler.prepare(request(n=3, seed=10, top_k=-1, max_tokens=9, max_completion_tokens=5))
    assert [params.seed for params in prepared.choices] == [10, 11, 12]
    for params in prepared.choices:
        assert (params.temperature, params.top_p, params.repetition_penalty) == (0.7, 0.8, 1.05)
        assert params.top_k == 0 and params.max_new_tokens == 5


async def test_the_handler_refuses_an_answer_that_would_not_fit_the_context(handler_for):
    """With MAX_MODEL_LEN small, a prompt that fits but max_tokens that does not is the context-length 400,
    and without max_tokens the answer is cut to the room left."""
    handler = await handler_for(max_model_len=64)
    prepared = await handler.prepare(request())
    room = 64 - prepared.inputs.prompt_tokens
    assert 0 < room < 64 and [params.max_new_tokens for params in prepared.choices] == [room]
    with pytest.raises(InvalidRequestError) as caught:
        await handler.prepare(request(max_completion_tokens=room + 1))
    assert caught.value.code == "context_length_exceeded"
    assert f"you requested {64 + 1} tokens" in caught.value.message
