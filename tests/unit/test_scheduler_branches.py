"""Scheduler branches that only unusual moments reach, run on the tiny models with real forward passes.

- a decode step (not the prefill) that raises: out of memory becomes the 503 `out_of_memory`, anything else
  reaches the client as it is; every running sequence is answered and the next request is served;
- a job cancelled while its own prefill runs: `abort`, counted, and no decode step for it;
- rows of one prefill group that end at their first token (end token forced, or max_tokens=1) while the
  others go on: the others produce exactly their lone answers, and the batch keeps the right cache rows;
- requests racing shutdown: each is answered (`abort`, or the 503 `shutting_down`), none waits forever;
- a stop string that only the final flush completes (a held partial character, a held stop prefix);
- +inf / -inf logits: the `non_finite_logits` error.

The model always runs; `LmHeadHook` only changes what its `lm_head` says at a chosen forward pass (call 0 is
the prefill of the first group, then one call per decode step), or runs code at that moment. Waits between
threads use events with timeouts, never sleeps.
"""

from __future__ import annotations

import asyncio
import math
import threading
from contextlib import asynccontextmanager

import httpx
import pytest
import torch
from asgi_lifespan import LifespanManager

from backend.app import create_app
from backend.engines.events import EngineStats
from backend.engines.transformers_engine.engine import TransformersEngine
from backend.engines.transformers_engine.generation import Failed, Finished, GenerationJob, TextDelta
from backend.engines.transformers_engine.loader import load_model
from backend.engines.transformers_engine.prompt import ChatTurn, PromptBuilder
from backend.engines.transformers_engine.sampling import SamplingParams
from backend.engines.transformers_engine.scheduler import Scheduler, generate_alone
from backend.errors import ModelNotReadyError, ModelOutputError, OutOfMemoryError
from backend.media.resize import PixelBounds
from tests.conftest import make_settings
from tests.helpers import LmHeadHook, forcing, parse_sse

BOUNDS = PixelBounds(56 * 56, 360 * 420)
GUARD = 30.0  # the longest any wait here may take: a hang fails the test instead of the whole run
# Four prompts of four different lengths: rows of one prefill group are left-padded differently, so a row
# that picked up another's cache (or padding) would answer differently.
PROMPTS = ["舌质淡红，舌苔薄白，脉缓。请分析体质并给出调理建议。", "What herb is ginseng?", "你好", "舌"]

def inputs_for(loaded, text: str):
    """Model inputs for a one-message conversation, built as the server builds them."""
    builder = PromptBuilder(loaded.tokenizer, loaded.chat_template, loaded.image_processor, loaded.image_token_id)
    return builder.build([ChatTurn("user", [text])], BOUNDS)


class Recorder:
    """One job's events, in order; final events also go to `stats` (as the engine's listeners do)."""

    def __init__(self, stats: EngineStats | None = None) -> None:
        self.events: list = []
        self.stats = stats

    def __call__(self, event) -> None:
        self.events.append(event)
        if self.stats is not None and not isinstance(event, TextDelta):
            self.stats.record(event)

    @property
    def text(self) -> str:
        return "".join(event.text for event in self.events if isinstance(event, TextDelta))

    @property
    def last(self):
        return self.events[-1]


def make_job(inputs, name: str = "r", stats: EngineStats | None = None, **params):
    """A greedy job with a recorder as its `emit`."""
    recorder = Recorder(stats)
    sampling = SamplingParams(**{"max_new_tokens": 12, "temperature": 0.0, **params})
    return GenerationJob(name, inputs, sampling, recorder), recorder


def solo(loaded, inputs, **params) -> Recorder:
    """The job's answer when it runs alone (the reference a batched row must match)."""
    job, recorder = make_job(inputs, "solo", **params)
    generate_alone(loaded, job)
    return recorder


def new_scheduler(loaded) -> Scheduler:
    return Scheduler(loaded, max_batch_size=8, max_batch_tokens=1 << 20, max_queue=16)


def raising_at(call_index: int, make_error):
    """An LmHeadHook action that raises `make_error()` at one forward pass and passes the others through."""

    def action(call: int, logits: torch.Tensor) -> torch.Tensor:
        if call == call_index:
            raise make_error()
        return logits

    return action


def oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


class Boom(RuntimeError):
    """An unexpected failure inside the model (a kernel error, a bug in a patched layer)."""


def assert_batch_rows(scheduler: Scheduler, jobs: list[GenerationJob], prompt_tokens: list[int], steps: int):
    """The running batch holds exactly `jobs`, in order, one cache row and one mask row each, and row i's
    mask counts its own prompt plus the `steps` tokens fed since (so no row holds another's cache)."""
    batch = scheduler.batch
    assert [row.job for row in batch.rows] == jobs
    assert batch.mask is not None and batch.mask.shape[0] == len(jobs)
    for layer in batch.cache.layers:
        assert layer.keys.shape[0] == layer.values.shape[0] == len(jobs)
        assert layer.keys.shape[2] == batch.mask.shape[1]
    assert [int(count) for count in batch.mask.sum(dim=1)] == [tokens + steps for tokens in prompt_tokens]


# --- 1. a decode step that raises ---


FAILURES = {
    "out of memory": (oom, lambda error: isinstance(error, OutOfMemoryError) and error.code == "out_of_memory"),
    "other exception": (lambda: Boom("kernel failed"), lambda error: isinstance(error, Boom)),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failing_decode_step_answers_every_running_row_and_the_next_job_runs(vl, failure):
    """Two rows prefilled together (call 0), one good decode step (call 1), then the second decode step
    raises: both rows get the error after their two tokens, the batch is emptied, and a new job on the same
    scheduler answers exactly as it would alone."""
    make_error, is_expected = FAILURES[failure]
    scheduler = new_scheduler(vl)
    first, second = (make_job(inputs_for(vl, text), text, max_new_tokens=20, ignore_eos=True) for text in PROMPTS[:2])
    scheduler.submit(first[0])
    scheduler.submit(second[0])
    with LmHeadHook(vl.model, raising_at(2, make_error)) as hook:
        scheduler.run_until_idle()
    # The hook counts the passes it returned from: the prefill and one decode step (the third raised).
    assert hook.calls == 2 and scheduler.prefill_passes == 1 and scheduler.decode_steps == 2
    errors = []
    for _, recorder in (first, second):
        assert isinstance(recorder.last, Failed), recorder.events
        assert [event.completion_tokens for event in recorder.events[:-1]] == [1, 2]
        errors.append(recorder.last.error)
    assert all(is_expected(error) for error in errors), errors
    if failure == "out of memory":
        assert errors[0].status_code == 503 and errors[0].error_type == "service_unavailable"
    else:
        assert str(errors[0]) == "kernel failed"  # the exception itself, not a wrapper
    assert len(scheduler.batch) == 0 and scheduler.batch.cache is None and scheduler.batch.mask is None

    follow_up = inputs_for(vl, PROMPTS[2])
    job, recorder = make_job(follow_up, "next")
    scheduler.submit(job)
    scheduler.run_until_idle()
    reference = solo(vl, follow_up)
    assert isinstance(recorder.last, Finished) and recorder.text == reference.text
    assert recorder.last.completion_tokens == reference.last.completion_tokens


@asynccontextmanager
async def running_engine(model_dir, **overrides):
    """An engine over the tiny checkpoint, loaded on its own inference thread; shut down afterwards."""
    engine = TransformersEngine(make_settings(model_dir, **overrides))
    await engine.start()
    await engine.wait_until_loaded()
    assert engine.state == "ready", engine.error
    try:
        yield engine
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("failure", list(FAILURES))
async def test_a_decode_step_failure_reaches_the_stream_and_the_engine_serves_on(tiny_vl_dir, failure):
    """Through the engine: the stream's reader gets the error raised (the 503 APIError for out of memory,
    the original exception otherwise), the failure is counted, and the next request is answered."""
    make_error, is_expected = FAILURES[failure]
    params = SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True)
    async with running_engine(tiny_vl_dir) as engine:
        inputs = await engine.prepare([ChatTurn("user", [PROMPTS[0]])])
        with LmHeadHook(engine.loaded.model, raising_at(2, make_error)) as hook:
            stream = engine.generate("failing", inputs, params)
            with pytest.raises(Exception) as caught:
                await asyncio.wait_for(stream.collect(), GUARD)
            assert hook.calls == 2  # the prefill and one good decode step returned; the next pass raised
        assert is_expected(caught.value), caught.value
        assert engine.stats.failed == 1
        result = await asyncio.wait_for(engine.generate("next", inputs, params).collect(), GUARD)
        assert result.finish.finish_reason == "length" and result.finish.completion_tokens == 20


HTTP_FAILURES = {
    # failure: (status of a non-streaming answer, the error's type and code, in the envelope or the SSE event)
    "out of memory": (503, "service_unavailable", "out_of_memory"),
    "other exception": (500, "server_error", None),  # unexpected: reported, its text not leaked
}


@pytest.mark.parametrize("failure", list(HTTP_FAILURES))
async def test_a_decode_step_failure_over_http_and_the_next_request(tiny_vl_dir, failure):
    """The client's view: out of memory is the 503 `out_of_memory` envelope, anything else the generic 500
    envelope; once a stream has started, the same error arrives as an event before [DONE]. The server then
    answers the next request normally."""
    make_error = FAILURES[failure][0]
    status, error_type, code = HTTP_FAILURES[failure]
    app = create_app(make_settings(tiny_vl_dir))
    body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
        await app.state.engine.wait_until_loaded()
        # raise_app_exceptions=False: the client gets the 500 response a real server sends, not the exception.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=GUARD) as client:
            model = app.state.engine.loaded.model
            with LmHeadHook(model, raising_at(1, make_error)):  # call 0 is the prefill, call 1 a decode step
                response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert (error["type"], error["code"]) == (error_type, code)
            assert "kernel failed" not in error["message"]

            with LmHeadHook(model, raising_at(1, make_error)):
                streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
            events = parse_sse(streamed.text)
            assert events[-1] == "[DONE]"
            errors = [event["error"] for event in events if isinstance(event, dict) and "error" in event]
            assert [(error["type"], error["code"]) for error in errors] == [(error_type, code)]

            after = await client.post("/v1/chat/completions", json=body)
            assert after.status_code == 200, after.text
            assert after.json()["usage"]["completion_tokens"] == 8


# --- 2. cancelled while its own prefill runs ---


def test_a_job_cancelled_during_its_prefill_ends_with_abort_and_no_decode_step(vl):
    """The client leaves while the prefill pass runs (the flag is set from inside that forward pass): the job
    ends `abort` right after the prefill, the abort is counted, and no decode step runs for it."""
    stats = EngineStats()
    scheduler = new_scheduler(vl)
    job, recorder = make_job(inputs_for(vl, PROMPTS[0]), stats=stats, max_new_tokens=50, ignore_eos=True)

    def cancel_in_prefill(call, logits):
        if call == 0:
            job.cancelled.set()
        return logits

    scheduler.submit(job)
    with LmHeadHook(vl.model, cancel_in_prefill) as hook:
        scheduler.run_until_idle()
    finished = recorder.last
    assert isinstance(finished, Finished) and finished.finish_reason == "abort"
    assert hook.calls == 1 and scheduler.decode_steps == 0  # the prefill pass only
    assert finished.completion_tokens <= 1  # at most the token the prefill itself chose
    assert all(event.completion_tokens <= 1 for event in recorder.events if isinstance(event, TextDelta))
    assert stats.finished["abort"] == 1 and stats.last_aborted_tokens == finished.completion_tokens
    assert len(scheduler.batch) == 0


def test_a_job_cancelled_in_a_group_prefill_leaves_and_its_neighbours_are_unchanged(vl):
    """Three prompts prefilled in one pass; the middle one is cancelled during it. It ends `abort`; the
    other two keep their own cache rows and answer exactly as they do alone."""
    all_inputs = [inputs_for(vl, text) for text in PROMPTS[:3]]
    expected = [solo(vl, inputs, max_new_tokens=15, ignore_eos=True) for inputs in all_inputs]
    jobs = [make_job(inputs, f"r{i}", max_new_tokens=15, ignore_eos=True) for i, inputs in enumerate(all_inputs)]
    victim = jobs[1][0]

    def cancel_in_prefill(call, logits):
        if call == 0:
            victim.cancelled.set()
        return logits

    scheduler = new_scheduler(vl)
    for job, _ in jobs:
        scheduler.submit(job)
    with LmHeadHook(vl.model, cancel_in_prefill):
        scheduler.step()
        assert scheduler.prefill_passes == 1
        kept = [0, 2]
        assert_batch_rows(scheduler, [jobs[i][0] for i in kept], [all_inputs[i].prompt_tokens for i in kept], 1)
        scheduler.run_until_idle()
    assert jobs[1][1].last.finish_reason == "abort" and jobs[1][1].last.completion_tokens <= 1
    for index in (0, 2):
        assert jobs[index][1].text == expected[index].text
        assert jobs[index][1].last.completion_tokens == expected[index].last.completion_tokens == 15


async def test_the_engine_counts_a_generation_cancelled_during_its_prefill(tiny_vl_dir):
    """Through the engine: the stream is cancelled (as a disconnecting client does) while its prefill runs;
    it finishes `abort`, `/health`'s counters see one abort, and the model ran once."""
    submitted = threading.Event()
    streams = []

    def cancel_in_prefill(call, logits):
        if call == 0:
            assert submitted.wait(GUARD)  # the stream object exists once `generate` has returned
            streams[0].cancel()
        return logits

    async with running_engine(tiny_vl_dir) as engine:
        inputs = await engine.prepare([ChatTurn("user", [PROMPTS[0]])])
        with LmHeadHook(engine.loaded.model, cancel_in_prefill) as hook:
            params = SamplingParams(max_new_tokens=500, temperature=0.0, ignore_eos=True)
            streams.append(engine.generate("r", inputs, params))
            submitted.set()
            result = await asyncio.wait_for(streams[0].collect(), GUARD)
        assert result.finish.finish_reason == "abort" and result.finish.completion_tokens <= 1
        assert engine.stats.finished["abort"] == 1
        assert engine.stats.last_aborted_tokens == result.finish.completion_tokens
        assert hook.calls == 1


# --- 3. rows that end at their first token, in a group with rows that go on ---


def end_at_first_token(rows: list[int], eos: int, at_call: dict):
    """An LmHeadHook action: at forward pass `at_call["call"]`, force the end token in the given rows."""

    def action(call: int, logits: torch.Tensor) -> torch.Tensor:
        if call != at_call["call"] or not rows:
            return logits
        forced = logits.clone()
        for row in rows:
            forced[row, -1] = -10.0
            forced[row, -1, eos] = 10.0
        return forced

    return action


# Sampling per kind of row: the end token is forced by the hook (so that row must not ignore it); the rows
# that go on ignore it, so they run their full length whatever the tiny model says.
SPEC_BY_ENDING = {
    "eos": {"max_new_tokens": 12},
    "one token": {"max_new_tokens": 1},
    None: {"max_new_tokens": 12, "ignore_eos": True},
}
ENDINGS = {
    "the longest row ends on the end token": {0: "eos"},
    "a middle row has max_tokens 1": {1: "one token"},
    "two rows end, one each way": {0: "one token", 2: "eos"},
    "the last row ends on the end token": {3: "eos"},
}


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_rows_ending_at_their_first_token_leave_a_group_prefill_cleanly(vl, ending):
    """Four prompts of different lengths are prefilled in one pass (in submission order, rows 0-3); some end
    at their first token. Those answer at once (`stop` with no token, or `length` with one); the batch then
    holds only the others' cache rows, and the others answer exactly as they do alone."""
    ends = ENDINGS[ending]
    eos = min(vl.eos_token_ids)
    all_inputs = [inputs_for(vl, text) for text in PROMPTS]
    specs = [SPEC_BY_ENDING[ends.get(i)] for i in range(len(PROMPTS))]
    jobs = [make_job(inputs, f"r{i}", **spec) for i, (inputs, spec) in enumerate(zip(all_inputs, specs))]
    going_on = [i for i in range(len(PROMPTS)) if i not in ends]
    eos_rows = [i for i, kind in ends.items() if kind == "eos"]

    scheduler = new_scheduler(vl)
    for job, _ in jobs:
        scheduler.submit(job)
    with LmHeadHook(vl.model, end_at_first_token(eos_rows, eos, {"call": 0})):
        scheduler.step()  # the group prefill, then one decode step for the rows that joined
        assert scheduler.prefill_passes == 1
        assert_batch_rows(
            scheduler, [jobs[i][0] for i in going_on], [all_inputs[i].prompt_tokens for i in going_on], 1
        )
        scheduler.run_until_idle()

    for i, kind in ends.items():
        recorder = jobs[i][1]
        if kind == "eos":
            assert recorder.events == [recorder.last] and recorder.last.finish_reason == "stop"
            assert recorder.last.completion_tokens == 0
        else:
            assert recorder.last.finish_reason == "length" and recorder.last.completion_tokens == 1
            assert recorder.text == solo(vl, all_inputs[i], max_new_tokens=1).text
    for i in going_on:
        reference = solo(vl, all_inputs[i], **specs[i])
        assert jobs[i][1].text == reference.text, f"row {i}"
        assert jobs[i][1].last.completion_tokens == reference.last.completion_tokens == 12


def test_rows_ending_at_their_first_token_join_a_running_batch_cleanly(vl):
    """A job already decodes; a group of three arrives, of which the first ends on the end token and the last
    has max_tokens 1. Only the middle one joins (the running batch is padded to fit it), and both survivors
    answer exactly as they do alone."""
    eos = min(vl.eos_token_ids)
    running_inputs, *group_inputs = (inputs_for(vl, text) for text in PROMPTS)
    running, running_events = make_job(running_inputs, "running", max_new_tokens=16, ignore_eos=True)
    group = [
        make_job(group_inputs[0], "ends on eos", max_new_tokens=12),
        make_job(group_inputs[1], "goes on", max_new_tokens=12, ignore_eos=True),
        make_job(group_inputs[2], "one token", max_new_tokens=1),
    ]
    target = {"call": None}
    scheduler = new_scheduler(vl)
    with LmHeadHook(vl.model, end_at_first_token([0], eos, target)) as hook:
        scheduler.submit(running)
        scheduler.step()  # the running job's prefill and first decode step
        for job, _ in group:
            scheduler.submit(job)
        target["call"] = hook.calls  # the next forward pass is the group's prefill
        scheduler.step()
        assert scheduler.prefill_passes == 2
        assert_batch_rows(
            scheduler, [running, group[1][0]], [running_inputs.prompt_tokens + 1, group_inputs[1].prompt_tokens], 1
        )
        scheduler.run_until_idle()
    assert group[0][1].last.finish_reason == "stop" and group[0][1].last.completion_tokens == 0
    assert group[2][1].last.finish_reason == "length" and group[2][1].last.completion_tokens == 1
    assert running_events.text == solo(vl, running_inputs, max_new_tokens=16, ignore_eos=True).text
    assert group[1][1].text == solo(vl, group_inputs[1], max_new_tokens=12, ignore_eos=True).text


def test_a_group_whose_rows_all_end_at_their_first_token_runs_no_decode_step(vl):
    """Every row of the group is done after the prefill: nothing joins, no decode step runs, the batch stays
    empty, and the scheduler is idle."""
    eos = min(vl.eos_token_ids)
    first = make_job(inputs_for(vl, PROMPTS[0]), "eos")
    second = make_job(inputs_for(vl, PROMPTS[1]), "one", max_new_tokens=1)
    scheduler = new_scheduler(vl)
    scheduler.submit(first[0])
    scheduler.submit(second[0])
    with LmHeadHook(vl.model, end_at_first_token([0], eos, {"call": 0})) as hook:
        assert scheduler.step() is False
    assert hook.calls == 1 and scheduler.decode_steps == 0
    assert len(scheduler.batch) == 0 and scheduler.batch.cache is None
    assert (first[1].last.finish_reason, second[1].last.finish_reason) == ("stop", "length")


# --- 4. requests racing shutdown ---


def test_a_job_submitted_after_stop_is_refused_with_503_shutting_down(vl):
    scheduler = new_scheduler(vl)
    scheduler.stop()
    job, recorder = make_job(inputs_for(vl, PROMPTS[3]))
    with pytest.raises(ModelNotReadyError) as caught:
        scheduler.submit(job)
    assert caught.value.status_code == 503 and caught.value.code == "shutting_down"
    assert recorder.events == []  # refused at the door: nothing else will answer it


def test_a_job_admitted_just_as_shutdown_begins_is_aborted_without_running(vl):
    """`stop()` cancels what waits and what runs, but a job taken from the queue and not yet started is in
    neither list. Here shutdown begins exactly then: a step admits `admitted` and, before starting it, answers
    the already-cancelled `leaving` job, whose client reacts by stopping the scheduler. The admitted job must
    end `abort` without a forward pass, and `run` must return."""
    inputs = inputs_for(vl, PROMPTS[2])
    scheduler = new_scheduler(vl)
    leaving, leaving_events = make_job(inputs, "leaving")
    admitted, admitted_events = make_job(inputs, "admitted", max_new_tokens=500, ignore_eos=True)
    leaving.cancelled.set()

    def stop_when_answered(event):
        leaving_events(event)
        scheduler.stop()  # shutdown begins between the admission and the start of `admitted`

    leaving.emit = stop_when_answered
    scheduler.submit(leaving)
    scheduler.submit(admitted)
    with LmHeadHook(vl.model, lambda call, logits: logits) as hook:
        thread = threading.Thread(target=scheduler.run, name="test-inference", daemon=True)
        thread.start()
        thread.join(GUARD)
    assert not thread.is_alive(), "Scheduler.run did not return after stop()"
    assert leaving_events.last.finish_reason == "abort"
    assert len(admitted_events.events) == 1 and admitted_events.last.finish_reason == "abort"
    assert admitted_events.last.completion_tokens == 0 and hook.calls == 0


async def test_requests_racing_engine_shutdown_all_get_an_answer(tiny_vl_dir):
    """One request decodes (held inside its first decode step), three wait in the queue, then shutdown begins
    and one more arrives. The late one is refused 503 `shutting_down`; the four others end `abort` (the
    queued ones without a token); shutdown returns; nothing waits past the guard."""
    in_step, release = threading.Event(), threading.Event()

    def hold_first_decode_step(call, logits):
        if call == 1:
            in_step.set()
            release.wait(GUARD)
        return logits

    long = SamplingParams(max_new_tokens=5000, temperature=0.0, ignore_eos=True)
    async with running_engine(tiny_vl_dir, max_batch_size=1) as engine:
        inputs = await engine.prepare([ChatTurn("user", [PROMPTS[2]])])
        with LmHeadHook(engine.loaded.model, hold_first_decode_step):
            try:
                running = engine.generate("running", inputs, long)
                assert await asyncio.to_thread(in_step.wait, GUARD)
                queued = [engine.generate(f"queued-{i}", inputs, long) for i in range(3)]
                stopping = asyncio.ensure_future(engine.shutdown())
                await asyncio.sleep(0)  # one turn of the loop: shutdown() runs up to its first await (stop())
                with pytest.raises(ModelNotReadyError) as caught:
                    engine.generate("late", inputs, long)
                assert caught.value.status_code == 503 and caught.value.code == "shutting_down"
            finally:
                release.set()
            results = await asyncio.wait_for(asyncio.gather(*(s.collect() for s in [running, *queued])), GUARD)
            await asyncio.wait_for(stopping, GUARD)
    assert [result.finish.finish_reason for result in results] == ["abort"] * 4
    assert 1 <= results[0].finish.completion_tokens < 5000
    assert [result.finish.completion_tokens for result in results[1:]] == [0, 0, 0]
    assert engine.stats.finished["abort"] == 4


async def test_shutdown_while_the_model_loads_returns_once_the_load_ends(tiny_vl_dir):
    """SIGTERM during the (minutes-long) load: requests meanwhile get 503 `model_loading`, and shutdown must
    end the engine rather than leave it serving after the load."""
    release = threading.Event()

    def gated_loader(settings):
        assert release.wait(GUARD)
        return load_model(settings)

    engine = TransformersEngine(make_settings(tiny_vl_dir), loader=gated_loader)
    await engine.start()
    with pytest.raises(ModelNotReadyError) as caught:
        engine.require_ready()
    assert caught.value.code == "model_loading"
    stopping = asyncio.ensure_future(engine.shutdown())
    await asyncio.sleep(0)  # shutdown() has begun while the loader is still held
    release.set()
    await asyncio.wait_for(engine.wait_until_loaded(), GUARD)
    try:
        done, _ = await asyncio.wait({stopping}, timeout=5)
        assert stopping in done, "shutdown() still waits for an inference thread that is serving"
    finally:
        if not stopping.done() and engine.scheduler is not None:
            engine.scheduler.stop()  # end the thread this test started, so the task (and the run) can finish
        await asyncio.wait_for(stopping, GUARD)


# --- 5. a stop string only the final flush completes ---


def split_character_token(tokenizer) -> tuple[int, str]:
    """A token whose bytes are whole characters followed by the start of another character: decoded alone
    it is `text + U+FFFD`, so the detokenizer holds the whole of it back until more bytes or the flush."""
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        head = text[:-1]
        if len(text) >= 2 and text.endswith("\ufffd") and "\ufffd" not in head and head.strip() == head:
            if "舌" not in head:
                return token_id, head
    raise AssertionError("the tiny tokenizer has no token that ends inside a character")


@pytest.mark.parametrize(
    ("stop", "expected"),
    [("{head}", "舌"), ("舌{head}", ""), ("龘", "舌{head}\ufffd")],
    ids=["held by the detokenizer", "stop prefix held by the matcher too", "no stop (baseline)"],
)
def test_a_stop_string_completed_by_the_final_flush(vl, stop, expected):
    """The answer is `舌` then a token `<head><first bytes of a character>`, and max_tokens ends it there.
    The detokenizer holds `<head>` until the end (the character is incomplete), so a stop string ending in it
    is only completed by `finish`: the answer must end `stop` with the stop string cut. The baseline (a stop
    string that never occurs) shows the same answer otherwise ends `length` with everything shown."""
    tokenizer = vl.tokenizer
    split_id, head = split_character_token(tokenizer)
    [she] = tokenizer("舌", add_special_tokens=False)["input_ids"]
    stop, expected = stop.format(head=head), expected.format(head=head)
    inputs = inputs_for(vl, PROMPTS[3])
    job, recorder = make_job(inputs, max_new_tokens=2, stop=(stop,))
    with LmHeadHook(vl.model, forcing([she, split_id], end_token=min(vl.eos_token_ids))):
        generate_alone(vl, job)
    finished = recorder.last
    assert isinstance(finished, Finished) and finished.completion_tokens == 2
    assert recorder.text == expected
    assert finished.finish_reason == ("length" if stop == "龘" else "stop")


# --- 6. infinite logits ---


@pytest.mark.parametrize("value", [math.inf, -math.inf], ids=["+inf", "-inf"])
@pytest.mark.parametrize("at_call", [0, 2], ids=["in the prefill", "in a decode step"])
def test_infinite_logits_end_the_request_with_non_finite_logits(vl, value, at_call):
    """One infinite logit among finite ones (an overflow that NaN checks alone would miss) ends the request
    with the 500 `non_finite_logits` error after the tokens already chosen; the next request is fine."""
    inputs = inputs_for(vl, PROMPTS[1])

    def poison(call, logits):
        if call != at_call:
            return logits
        poisoned = logits.clone()
        poisoned[..., 7] = value
        return poisoned

    job, recorder = make_job(inputs, max_new_tokens=10, ignore_eos=True)
    with LmHeadHook(vl.model, poison):
        generate_alone(vl, job)
    assert isinstance(recorder.last, Failed), recorder.events
    error = recorder.last.error
    assert isinstance(error, ModelOutputError) and error.code == "non_finite_logits" and error.status_code == 500
    assert f"answer token {at_call + 1}" in error.message
    assert [event.completion_tokens for event in recorder.events[:-1]] == list(range(1, at_call + 1))
    assert isinstance(solo(vl, inputs).last, Finished)


def test_infinite_logits_in_one_row_leave_the_other_rows_unchanged(vl):
    """In a batch of three, only the middle row's logits hold +inf at the second decode step: that row fails
    `non_finite_logits`, the others answer exactly as they do alone."""
    all_inputs = [inputs_for(vl, text) for text in PROMPTS[:3]]
    expected = [solo(vl, inputs, max_new_tokens=10, ignore_eos=True).text for inputs in all_inputs]
    jobs = [make_job(inputs, f"r{i}", max_new_tokens=10, ignore_eos=True) for i, inputs in enumerate(all_inputs)]

    def poison_row_one(call, logits):
        if call != 2:
            return logits
        poisoned = logits.clone()
        poisoned[1, -1, 7] = math.inf
        return poisoned

    scheduler = new_scheduler(vl)
    for job, _ in jobs:
        scheduler.submit(job)
    with LmHeadHook(vl.model, poison_row_one):
        scheduler.run_until_idle()
    assert scheduler.prefill_passes == 1
    assert isinstance(jobs[1][1].last, Failed) and jobs[1][1].last.error.code == "non_finite_logits"
    assert [jobs[0][1].text, jobs[2][1].text] == [expected[0], expected[2]]
