"""No request can stop the inference thread: bad seeds, failures while the batch is admitted, grown or
shrunk, and an escaped exception each fail the requests they touch; a thread that dies anyway says so."""

import asyncio
import threading
import time

import pytest
import torch
from pydantic import ValidationError

import backend.engines.transformers_engine.generation as generation_module
from backend.engines.transformers_engine.batch import DecodeBatch
from backend.engines.transformers_engine.generation import Failed, Finished
from backend.engines.transformers_engine.prompt import ChatTurn
from backend.engines.transformers_engine.sampling import SamplingParams, make_generator
from backend.engines.transformers_engine.scheduler import Scheduler
from backend.errors import ModelNotReadyError, OutOfMemoryError, QueueFullError
from backend.protocol.chat import ChatCompletionRequest
from tests.helpers import Gate, LmHeadHook, loaded_engine, wait_for
from tests.unit.test_batching import alone, inputs_for, job

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 1180591620717411303424])
def test_a_seed_outside_64_bits_is_refused_by_the_protocol(seed):
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": MESSAGES, "seed": seed})


def test_every_seed_the_protocol_accepts_seeds_a_generator_even_plus_the_choice_index():
    for seed in (2**63 - 1 + 3, -(2**63), -1, 0, 2**64 + 5):  # seed + choice index may pass 2**63
        make_generator(seed, torch.device("cpu"))
    draws = [torch.rand(3, generator=make_generator(seed, torch.device("cpu"))) for seed in (-1, 2**64 - 1)]
    assert torch.equal(*draws)  # the same seed modulo 2**64, the same numbers


def scheduler_for(loaded, **limits):
    return Scheduler(loaded, limits.get("size", 8), limits.get("tokens", 1 << 20), max_queue=limits.get("queue", 64))


def test_a_job_whose_sampling_state_cannot_be_built_fails_alone(vl, monkeypatch):
    inputs = inputs_for(vl, "你好")
    reference = alone(vl, inputs, max_new_tokens=6).text
    real = generation_module.make_generator

    def fragile(seed, device):
        if seed == 666:
            raise OverflowError("Overflow when unpacking long long")
        return real(seed, device)

    monkeypatch.setattr(generation_module, "make_generator", fragile)
    bad, bad_events = job(inputs, "bad", seed=666, max_new_tokens=6)
    good, good_events = job(inputs, "good", max_new_tokens=6)
    scheduler = scheduler_for(vl)
    scheduler.submit(bad, good)
    scheduler.run_until_idle()
    assert isinstance(bad_events.last, Failed) and isinstance(bad_events.last.error, OverflowError)
    assert isinstance(good_events.last, Finished) and good_events.text == reference


def failing_torch_op(monkeypatch, owner, name, fail_on_call):
    """Make `owner.<name>` (`torch.cat`, `torch.Tensor.index_select`) raise a CUDA-style out-of-memory error
    on its `fail_on_call`-th call while `active` is set (so only the operation under test fails, not the
    model's own use of it)."""
    real = getattr(owner, name)
    state = {"active": False, "calls": 0}

    def op(*args, **kwargs):
        if state["active"]:
            state["calls"] += 1
            if state["calls"] == fail_on_call:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, op)
    return state


@pytest.mark.parametrize("fail_on_call", [1, 2, 3, 4, 6, 9])  # in a key, a value, a padding, a later layer
def test_out_of_memory_while_the_batch_grows_fails_only_the_joining_request(vl, monkeypatch, fail_on_call):
    inputs = inputs_for(vl, "舌质淡红，舌苔薄白")
    reference = alone(vl, inputs, max_new_tokens=12).text
    running, running_events = job(inputs, "running", max_new_tokens=12)
    joining, joining_events = job(inputs_for(vl, "你好"), "joining", max_new_tokens=12)
    scheduler = scheduler_for(vl)
    scheduler.submit(running)
    scheduler.step()  # `running` is in the batch
    # A concatenation inside DecodeBatch.add fails: the layers already grown must be put back, or the running
    # row's cache would be corrupt.
    state = failing_torch_op(monkeypatch, torch, "cat", fail_on_call=fail_on_call)
    real_add = DecodeBatch.add

    def add(self, *args):
        state["active"] = True
        try:
            return real_add(self, *args)
        finally:
            state["active"] = False

    monkeypatch.setattr(DecodeBatch, "add", add)
    scheduler.submit(joining)
    scheduler.run_until_idle()
    assert isinstance(joining_events.last, Failed) and isinstance(joining_events.last.error, OutOfMemoryError)
    assert joining_events.last.error.code == "out_of_memory"
    assert isinstance(running_events.last, Finished) and running_events.text == reference


def test_out_of_memory_while_the_batch_shrinks_fails_the_rows_left_and_the_thread_goes_on(vl, monkeypatch):
    short, short_events = job(inputs_for(vl, "你好"), "short", max_new_tokens=2)
    long, long_events = job(inputs_for(vl, "舌质淡红"), "long", max_new_tokens=40)
    scheduler = scheduler_for(vl)
    scheduler.submit(short, long)
    state = failing_torch_op(monkeypatch, torch.Tensor, "index_select", fail_on_call=2)
    real_remove = DecodeBatch.remove

    def remove(self, indexes):
        state["active"] = bool(indexes)
        try:
            return real_remove(self, indexes)
        finally:
            state["active"] = False

    monkeypatch.setattr(DecodeBatch, "remove", remove)
    scheduler.run_until_idle()
    assert isinstance(short_events.last, Finished) and short_events.last.completion_tokens == 2
    assert isinstance(long_events.last, Failed) and long_events.last.error.code == "out_of_memory"
    assert len(scheduler.batch) == 0 and scheduler.batch.cache is None
    monkeypatch.setattr(DecodeBatch, "remove", real_remove)
    after, after_events = job(inputs_for(vl, "你好"), "after", max_new_tokens=3)
    scheduler.submit(after)
    scheduler.run_until_idle()
    assert isinstance(after_events.last, Finished) and after_events.last.completion_tokens == 3


async def test_an_exception_escaping_a_step_fails_the_batch_and_the_thread_serves_on(tiny_vl_dir, monkeypatch):
    engine = await loaded_engine(tiny_vl_dir)
    try:
        inputs = await engine.prepare([ChatTurn("user", ["你好"])])
        real_admit = Scheduler._admit
        calls = {"n": 0}

        def admit(self):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("a bug in admission")
            return real_admit(self)

        monkeypatch.setattr(Scheduler, "_admit", admit)
        first = engine.generate("first", inputs, SamplingParams(max_new_tokens=3, temperature=0))
        second_result = await asyncio.wait_for(
            engine.generate("second", inputs, SamplingParams(max_new_tokens=3, temperature=0)).collect(), 60
        )
        first_result = await asyncio.wait_for(first.collect(), 60)
        assert first_result.finish.completion_tokens == 3 and second_result.finish.completion_tokens == 3
        assert engine.state == "ready" and engine._thread.is_alive()
    finally:
        await engine.shutdown()


class ThreadKiller(BaseException):
    """Something the scheduler's per-step guard does not catch (as a SystemExit would be)."""


async def test_a_dead_inference_thread_is_visible_and_answers_everyone_at_once(tiny_vl_dir, monkeypatch):
    engine = await loaded_engine(tiny_vl_dir, max_batch_size=1)
    inputs = await engine.prepare([ChatTurn("user", ["你好"])])
    running = engine.generate("running", inputs, SamplingParams(max_new_tokens=5000, temperature=0, ignore_eos=True))
    await wait_for(lambda: engine.stats.generated_tokens == 0 and engine.scheduler.running == 1, 30)
    waiting = engine.generate("waiting", inputs, SamplingParams(max_new_tokens=3, temperature=0))

    def die(self):
        raise ThreadKiller("the thread is killed")

    monkeypatch.setattr(Scheduler, "step", die)
    for stream in (running, waiting):
        with pytest.raises(ModelNotReadyError) as failure:
            await asyncio.wait_for(stream.collect(), 30)
        assert failure.value.code == "engine_dead" and failure.value.status_code == 503
    engine._thread.join(30)
    assert not engine._thread.is_alive()
    assert engine.state == "error" and "ThreadKiller" in engine.error
    with pytest.raises(ModelNotReadyError) as refused:
        engine.generate("later", inputs, SamplingParams(max_new_tokens=3))
    assert refused.value.code == "engine_dead"
    await asyncio.wait_for(engine.shutdown(), 30)  # shutting down a dead engine does not hang


def test_n_choices_are_queued_all_or_none(vl):
    inputs = inputs_for(vl, "你好")
    scheduler = scheduler_for(vl, queue=2, size=1)  # room for three: one free batch row and two waiting
    scheduler.submit(job(inputs, "a")[0], job(inputs, "b")[0])
    with pytest.raises(Exception) as refused:
        scheduler.submit(*(job(inputs, f"n{i}")[0] for i in range(2)))
    assert getattr(refused.value, "status_code", None) == 429
    assert scheduler.waiting == 2  # nothing of the refused request was queued


async def test_jobs_in_their_prefill_are_not_free_rows_for_the_queue(tiny_vl_dir):
    """While admitted jobs prefill they have left the queue but are not in the batch yet: the queue limit
    must still count them, or MAX_QUEUE could be passed by a batch's worth."""
    engine = await loaded_engine(tiny_vl_dir, max_batch_size=4, max_queue=2)
    gate = Gate()

    def hold_the_prefill(call, logits):
        if call == 0:
            gate.stop_here()
        return logits

    try:
        inputs = await engine.prepare([ChatTurn("user", ["你好"])])
        params = SamplingParams(max_new_tokens=2, temperature=0)
        with LmHeadHook(engine.loaded.model, hold_the_prefill):
            prefilling = [engine.generate(f"p{i}", inputs, params) for i in range(4)]
            await gate.wait_reached()
            assert engine.scheduler.waiting == 0 and engine.scheduler.running == 0  # all four are starting
            queued = [engine.generate(f"q{i}", inputs, params) for i in range(2)]  # MAX_QUEUE of them wait
            with pytest.raises(QueueFullError):
                engine.generate("one-too-many", inputs, params)
            gate.open()
            results = await asyncio.wait_for(asyncio.gather(*(s.collect() for s in prefilling + queued)), 60)
        assert [result.finish.completion_tokens for result in results] == [2] * 6
    finally:
        gate.open()
        await engine.shutdown()


def test_a_failure_escaping_the_start_of_jobs_answers_them(vl, monkeypatch):
    """The per-step guard in `run` fails the jobs admitted in that step too, not only the running batch."""
    inputs = inputs_for(vl, "你好")
    scheduler = scheduler_for(vl)
    first, first_events = job(inputs, "first", max_new_tokens=3)
    monkeypatch.setattr(Scheduler, "_prefill_group", lambda self, jobs: (_ for _ in ()).throw(RuntimeError("bug")))
    scheduler.submit(first)
    thread = threading.Thread(target=scheduler.run)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not first.answered and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(first_events.last, Failed) and str(first_events.last.error) == "bug"
    finally:
        scheduler.stop()
        thread.join(30)
