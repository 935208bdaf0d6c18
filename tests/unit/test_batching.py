"""The scheduler and the running batch on the tiny model: batched answers equal lone answers, mixed
requests, early leavers, aborts, budgets, queue limits and deadlines."""

import time

import pytest
import torch
from PIL import Image

from backend.engines.transformers_engine.generation import Failed, Finished, GenerationJob, TextDelta
from backend.engines.transformers_engine.prompt import ChatTurn, PromptBuilder
from backend.engines.transformers_engine.sampling import SamplingParams
from backend.engines.transformers_engine.scheduler import Scheduler, generate_alone
from backend.errors import QueueFullError, RequestTimeoutError
from backend.media.resize import PixelBounds
from tests.helpers import LmHeadHook

BOUNDS = PixelBounds(56 * 56, 360 * 420)


def inputs_for(loaded, *parts):
    builder = PromptBuilder(loaded.tokenizer, loaded.chat_template, loaded.image_processor, loaded.image_token_id)
    images = [f"m{i}" for i, part in enumerate(parts) if not isinstance(part, str)]
    return builder.build([ChatTurn("user", list(parts), image_sources=images)], BOUNDS)


class Recorder:
    """Collects one job's events, with a global order number for each."""

    clock = 0

    def __init__(self):
        self.events = []

    def __call__(self, event):
        Recorder.clock += 1
        self.events.append((Recorder.clock, event))

    @property
    def text(self):
        return "".join(e.text for _, e in self.events if isinstance(e, TextDelta))

    @property
    def last(self):
        return self.events[-1][1]


def job(inputs, name="r", **params):
    recorder = Recorder()
    sampling = SamplingParams(**{"max_new_tokens": 16, "temperature": 0.0, **params})
    return GenerationJob(name, inputs, sampling, recorder), recorder


def alone(loaded, inputs, **params):
    single, recorder = job(inputs, **params)
    generate_alone(loaded, single)
    return recorder


def together(loaded, jobs, max_batch_size=32, max_batch_tokens=1 << 20):
    scheduler = Scheduler(loaded, max_batch_size, max_batch_tokens, max_queue=100)
    for queued in jobs:
        scheduler.submit(queued)
    scheduler.run_until_idle()
    return scheduler


PROMPTS = ["你好", "舌质淡红，舌苔薄白，脉缓。请分析体质并给出调理建议，越详细越好。", "What herb is ginseng?", "舌"]


def test_greedy_answers_are_the_same_alone_and_batched(vl):
    image = Image.new("RGB", (120, 90), (190, 60, 70))
    all_inputs = [inputs_for(vl, prompt) for prompt in PROMPTS] + [inputs_for(vl, image, "看舌")]
    expected = [alone(vl, inputs, max_new_tokens=20) for inputs in all_inputs]
    jobs = [job(inputs, f"r{i}", max_new_tokens=20) for i, inputs in enumerate(all_inputs)]
    together(vl, [queued for queued, _ in jobs])
    for (_, recorder), reference in zip(jobs, expected):
        assert recorder.text == reference.text
        assert recorder.last.completion_tokens == reference.last.completion_tokens


def test_text_only_model_batches_too(text_only):
    all_inputs = [inputs_for(text_only, prompt) for prompt in PROMPTS]
    expected = [alone(text_only, inputs).text for inputs in all_inputs]
    jobs = [job(inputs, f"r{i}") for i, inputs in enumerate(all_inputs)]
    together(text_only, [queued for queued, _ in jobs])
    assert [recorder.text for _, recorder in jobs] == expected


def test_mixed_sampling_lengths_and_stops_in_one_batch(vl):
    text = inputs_for(vl, PROMPTS[1])
    greedy_reference = alone(vl, text, max_new_tokens=30).text
    seeded_reference = alone(vl, text, temperature=0.9, top_p=0.9, seed=42, max_new_tokens=12).text
    stop = greedy_reference[8:10]
    specs = [
        {"max_new_tokens": 30},
        {"temperature": 0.9, "top_p": 0.9, "seed": 42, "max_new_tokens": 12},
        {"max_new_tokens": 30, "stop": (stop,)},
        {"temperature": 1.2, "top_k": 5, "seed": 7, "max_new_tokens": 3},
        {"max_new_tokens": 30, "repetition_penalty": 1.3, "presence_penalty": 0.5},
    ]
    jobs = [job(text, f"r{i}", **spec) for i, spec in enumerate(specs)]
    together(vl, [queued for queued, _ in jobs])
    recorders = [recorder for _, recorder in jobs]
    assert recorders[0].text == greedy_reference
    assert recorders[1].text == seeded_reference  # the seed reproduces whatever the batch around it
    assert recorders[2].text == greedy_reference[: greedy_reference.index(stop)]
    assert recorders[2].last.finish_reason == "stop"
    assert recorders[3].last.completion_tokens == 3
    assert all(isinstance(recorder.last, Finished) for recorder in recorders)


def test_a_short_answer_leaves_the_batch_at_once(vl):
    text = inputs_for(vl, PROMPTS[0])
    (long_job, long_events), (short_job, short_events) = (
        job(text, "long", max_new_tokens=40, ignore_eos=True),
        job(text, "short", max_new_tokens=2, ignore_eos=True),
    )
    together(vl, [long_job, short_job])
    short_finished_at = short_events.events[-1][0]
    long_tokens_before = sum(
        1 for order, e in long_events.events if isinstance(e, TextDelta) and order < short_finished_at
    )
    assert long_tokens_before <= 3  # the short one was answered after ~2 steps, not after 40
    assert long_events.last.completion_tokens == 40


def test_an_aborted_row_leaves_and_the_others_are_unchanged(vl):
    inputs = [inputs_for(vl, prompt) for prompt in PROMPTS[:3]]
    expected = [alone(vl, item, max_new_tokens=25).text for item in inputs]
    jobs = [job(item, f"r{i}", max_new_tokens=25) for i, item in enumerate(inputs)]
    victim_job, victim = jobs[1]
    original = victim.__call__

    def cancel_after_three(event):
        original(event)
        if isinstance(event, TextDelta) and event.completion_tokens == 3:
            victim_job.cancelled.set()

    victim_job.emit = cancel_after_three
    together(vl, [queued for queued, _ in jobs])
    assert victim.last.finish_reason == "abort" and victim.last.completion_tokens == 3
    assert [jobs[0][1].text, jobs[2][1].text] == [expected[0], expected[2]]


def test_padding_is_trimmed_when_the_longest_row_leaves(vl):
    scheduler = Scheduler(vl, 8, 1 << 20, 10)
    long_prompt, _ = job(inputs_for(vl, PROMPTS[1] * 4), "long", max_new_tokens=3, ignore_eos=True)
    short_prompt, _ = job(inputs_for(vl, "hi"), "short", max_new_tokens=10, ignore_eos=True)
    scheduler.submit(long_prompt)
    scheduler.submit(short_prompt)
    scheduler.step()  # both prefilled and joined
    wide = scheduler.batch.cache_length
    scheduler.step()  # the long prompt's row has its 3 tokens and leaves
    assert len(scheduler.batch) == 1
    assert scheduler.batch.cache_length < wide / 2


def test_the_token_budget_limits_what_runs_together(vl):
    text = inputs_for(vl, PROMPTS[0])
    cost = text.prompt_tokens + 10
    scheduler = Scheduler(vl, max_batch_size=8, max_batch_tokens=2 * cost, max_queue=10)
    for index in range(5):
        scheduler.submit(job(text, f"r{index}", max_new_tokens=10, ignore_eos=True)[0])
    seen = []
    while scheduler.step():
        seen.append(scheduler.running)
    assert max(seen) == 2


def test_a_full_queue_is_refused_with_429(vl):
    scheduler = Scheduler(vl, max_batch_size=1, max_batch_tokens=1 << 20, max_queue=2)
    text = inputs_for(vl, "hi")
    scheduler.submit(job(text)[0])  # takes the one free batch row at the next step
    scheduler.submit(job(text)[0])
    scheduler.submit(job(text)[0])  # two wait beyond the batch: MAX_QUEUE
    with pytest.raises(QueueFullError) as caught:
        scheduler.submit(job(text)[0])
    assert caught.value.status_code == 429 and "Retry-After" in caught.value.headers


def test_deadlines_stop_running_and_queued_jobs(vl):
    text = inputs_for(vl, "hi")
    running, running_events = job(text, "running", max_new_tokens=10_000, ignore_eos=True)
    queued, queued_events = job(text, "queued", max_new_tokens=5)
    running.deadline = queued.deadline = time.perf_counter() + 3600

    def deadlines_pass(call, logits):
        # The clock is moved by the model's steps, not by the machine's speed: the queued job's deadline
        # passes while it waits (second forward pass), the running one's at its fifth.
        if call == 1:
            queued.deadline = time.perf_counter()
        if call == 4:
            running.deadline = time.perf_counter()
        return logits

    with LmHeadHook(vl.model, deadlines_pass):
        together(vl, [running, queued], max_batch_size=1)
    for recorder in (running_events, queued_events):
        assert isinstance(recorder.last, Failed) and isinstance(recorder.last.error, RequestTimeoutError)
    assert not [e for _, e in queued_events.events if isinstance(e, TextDelta)]  # it never ran
    generated = [e for _, e in running_events.events if isinstance(e, TextDelta)]
    assert 0 < len(generated) <= 5  # stopped at its deadline's step, not at max_new_tokens


def test_one_bad_row_does_not_break_the_batch(vl):
    text = inputs_for(vl, "hi")
    expected = alone(vl, text, max_new_tokens=8).text
    (healthy, healthy_events), (broken, broken_events) = (
        job(text, "ok", max_new_tokens=8),
        job(text, "bad", max_new_tokens=8),
    )
    scheduler = Scheduler(vl, 8, 1 << 20, 10)
    scheduler.submit(healthy)
    scheduler.submit(broken)
    scheduler.step()
    # Poison the broken row's sampling: its logits become NaN from now on.
    row = next(r for r in scheduler.batch.rows if r.job is broken)
    row.choose = lambda logits, _choose=row.choose: _choose(torch.full_like(logits, float("nan")))
    scheduler.run_until_idle()
    assert isinstance(broken_events.last, Failed) and broken_events.last.error.code == "non_finite_logits"
    assert healthy_events.text == expected


def test_max_queue_zero_still_admits_what_fits_in_the_batch(vl):
    scheduler = Scheduler(vl, max_batch_size=1, max_batch_tokens=1 << 20, max_queue=0)
    text = inputs_for(vl, "hi")
    first, events = job(text, "first", max_new_tokens=2)
    scheduler.submit(first)  # the batch is empty: nothing would wait beyond it
    scheduler.run_until_idle()
    assert isinstance(events.last, Finished) and events.last.completion_tokens == 2
