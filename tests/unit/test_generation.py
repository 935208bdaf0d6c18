"""The decode loop on the tiny models: same tokens as transformers' `generate`, stops, aborts and faults."""

import pytest
import torch
from PIL import Image

from backend.engines.transformers_engine.generation import Failed, Finished, GenerationJob, TextDelta
from backend.engines.transformers_engine.prompt import ChatTurn, PromptBuilder
from backend.engines.transformers_engine.sampling import SamplingParams
from backend.engines.transformers_engine.scheduler import generate_alone as run_generation
from backend.errors import InvalidRequestError, ModelOutputError, OutOfMemoryError
from backend.media.resize import PixelBounds
from tests.helpers import LmHeadHook

BOUNDS = PixelBounds(56 * 56, 360 * 420)


def builder(loaded):
    return PromptBuilder(loaded.tokenizer, loaded.chat_template, loaded.image_processor, loaded.image_token_id)


def run(loaded, inputs, **sampling):
    events = []
    job = GenerationJob(
        "test", inputs, SamplingParams(**{"max_new_tokens": 12, "temperature": 0.0, **sampling}), events.append
    )
    run_generation(loaded, job)
    return events, job


def reference_ids(loaded, inputs, max_new_tokens):
    """What transformers' own greedy `generate` produces for the same inputs."""
    kwargs = {"input_ids": inputs.input_ids, "attention_mask": torch.ones_like(inputs.input_ids)}
    if inputs.pixel_values is not None:
        kwargs |= {
            "pixel_values": inputs.pixel_values,
            "image_grid_thw": inputs.image_grid_thw,
            "mm_token_type_ids": inputs.mm_token_type_ids,
        }
    output = loaded.model.generate(
        **kwargs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=sorted(loaded.eos_token_ids),
        repetition_penalty=1.0,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    return output[0, inputs.prompt_tokens :].tolist()


def answer(events):
    return "".join(event.text for event in events if isinstance(event, TextDelta))


TONGUE = Image.new("RGB", (120, 90), (190, 60, 70))
CONVERSATIONS = {
    "text": [ChatTurn("user", ["舌质淡红，舌苔薄白，这是什么体质？"])],
    "image": [ChatTurn("user", [TONGUE, "请分析舌象"], image_sources=["m0"])],
    "two images in two turns": [
        ChatTurn("user", [TONGUE, "第一张"], image_sources=["m0"]),
        ChatTurn("assistant", ["舌红"]),
        ChatTurn("user", ["对比", Image.new("RGB", (300, 60), (20, 90, 40))], image_sources=["m2"]),
    ],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_greedy_tokens_match_transformers_generate(vl, name):
    inputs = builder(vl).build(CONVERSATIONS[name], BOUNDS)
    events, _ = run(vl, inputs, max_new_tokens=24)
    finished = events[-1]
    assert isinstance(finished, Finished)
    expected = reference_ids(vl, inputs, 24)
    assert finished.completion_tokens == len(expected)
    assert answer(events) == vl.tokenizer.decode(expected, skip_special_tokens=True)


def test_text_only_model_matches_generate(text_only):
    inputs = builder(text_only).build(CONVERSATIONS["text"], BOUNDS)
    events, _ = run(text_only, inputs, max_new_tokens=16)
    expected = reference_ids(text_only, inputs, 16)
    assert answer(events) == text_only.tokenizer.decode(expected, skip_special_tokens=True)


def test_text_only_model_refuses_images(text_only):
    with pytest.raises(InvalidRequestError) as caught:
        builder(text_only).build(CONVERSATIONS["image"], BOUNDS)
    assert caught.value.code == "images_not_supported"


def test_image_tokens_follow_the_resized_grid(vl):
    inputs = builder(vl).build(CONVERSATIONS["image"], BOUNDS)
    # 120x90 -> smart_resize -> 112x84 (multiples of 28) -> 8x6 patches of 14 -> 4x3 merged tokens
    assert inputs.resized_image_sizes == [(112, 84)]
    assert inputs.image_token_counts == [12]
    assert int(inputs.mm_token_type_ids.sum()) == 12
    text_only_count = builder(vl).build([ChatTurn("user", ["请分析舌象"])], BOUNDS).prompt_tokens
    assert inputs.prompt_tokens == text_only_count + 2 + 12  # vision_start, vision_end, image tokens


def test_lower_max_pixels_means_fewer_image_tokens(vl):
    big = [ChatTurn("user", [Image.new("RGB", (1000, 800)), "看"], image_sources=["m0"])]
    default = builder(vl).build(big, BOUNDS)
    small = builder(vl).build(big, PixelBounds(56 * 56, 112 * 112))
    assert default.resized_image_sizes[0][0] * default.resized_image_sizes[0][1] <= 360 * 420
    assert small.image_token_counts[0] < default.image_token_counts[0]


def test_stop_string_ends_with_stop_and_is_not_returned(vl):
    inputs = builder(vl).build(CONVERSATIONS["text"], BOUNDS)
    full = answer(run(vl, inputs, max_new_tokens=30)[0])
    stop = full[6:8]
    events, _ = run(vl, inputs, max_new_tokens=30, stop=(stop,))
    assert events[-1].finish_reason == "stop"
    assert answer(events) == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible_and_seeds_differ(vl):
    inputs = builder(vl).build(CONVERSATIONS["text"], BOUNDS)
    first = answer(run(vl, inputs, temperature=1.0, seed=7)[0])
    again = answer(run(vl, inputs, temperature=1.0, seed=7)[0])
    others = {answer(run(vl, inputs, temperature=1.0, seed=seed)[0]) for seed in range(8, 12)}
    assert first == again
    assert len(others | {first}) > 1


def test_cancelled_before_start_generates_nothing(vl):
    inputs = builder(vl).build(CONVERSATIONS["text"], BOUNDS)
    events = []
    job = GenerationJob("test", inputs, SamplingParams(max_new_tokens=50, temperature=0.0), events.append)
    job.cancelled.set()
    run_generation(vl, job)
    assert events == [Finished("abort", inputs.prompt_tokens, 0, events[0].queue_seconds, None, 0.0)]


def test_cancel_during_generation_stops_at_the_next_token(vl):
    inputs = builder(vl).build(CONVERSATIONS["text"], BOUNDS)
    events = []
    job = GenerationJob("test", inputs, SamplingParams(max_new_tokens=50, temperature=0.0), None)

    def emit(event):
        events.append(event)
        if isinstance(event, TextDelta) and event.completion_tokens == 3:
            job.cancelled.set()

    job.emit = emit
    run_generation(vl, job)
    assert events[-1].finish_reason == "abort"
    assert events[-1].completion_tokens == 3


def test_non_finite_logits_end_the_request_with_a_clear_error(vl):
    inputs = builder(vl).build(CONVERSATIONS["text"], BOUNDS)
    with LmHeadHook(vl.model, lambda call, output: torch.full_like(output, float("nan"))):
        events, _ = run(vl, inputs)
    assert isinstance(events[-1], Failed)
    assert isinstance(events[-1].error, ModelOutputError)
    assert "DTYPE=bfloat16" in events[-1].error.message
    assert isinstance(run(vl, inputs)[0][-1], Finished)  # the next request is fine


def test_out_of_memory_fails_only_that_request(vl):
    inputs = builder(vl).build(CONVERSATIONS["text"], BOUNDS)

    def oom(call, output):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with LmHeadHook(vl.model, oom):
        events, _ = run(vl, inputs)
    assert isinstance(events[-1].error, OutOfMemoryError)
    assert events[-1].error.status_code == 503
    assert isinstance(run(vl, inputs)[0][-1], Finished)
