"""The engine: one inference thread, streams back on the event loop, cancellation and shutdown.

Aborts are proven by the engine's counters and by how few tokens the aborted generation made, not by a
later request that could have run beside it anyway; the tests wait for the scheduler's state, not a sleep.
"""

import asyncio
import threading

from backend.engines.transformers_engine.prompt import ChatTurn
from backend.engines.transformers_engine.sampling import SamplingParams
from tests.helpers import loaded_engine, wait_for


async def test_generation_runs_on_one_named_inference_thread(tiny_vl_dir):
    engine = await loaded_engine(tiny_vl_dir)
    seen = set()
    original = engine.loaded.model.forward

    def spy(*args, **kwargs):
        seen.add(threading.current_thread().name)
        return original(*args, **kwargs)

    engine.loaded.model.forward = spy
    try:
        inputs = await engine.prepare([ChatTurn("user", ["你好"])])
        streams = [engine.generate(f"r{i}", inputs, SamplingParams(max_new_tokens=3, temperature=0)) for i in range(3)]
        results = await asyncio.gather(*(stream.collect() for stream in streams))
    finally:
        del engine.loaded.model.forward
        await engine.shutdown()
    assert [result.finish.completion_tokens for result in results] == [3, 3, 3]
    assert len(seen) == 1 and next(iter(seen)).startswith("inference")
    assert threading.current_thread().name not in seen


async def test_leaving_a_stream_early_cancels_its_generation(tiny_vl_dir):
    # A batch of one: the follow-up can only start once the abandoned generation has left the batch.
    engine = await loaded_engine(tiny_vl_dir, max_batch_size=1)
    try:
        inputs = await engine.prepare([ChatTurn("user", ["你好"])])
        stream = engine.generate("r", inputs, SamplingParams(max_new_tokens=5000, temperature=0, ignore_eos=True))
        events = stream.events()
        async for delta in events:
            if delta.completion_tokens >= 2:
                break
        await events.aclose()  # what `async for` leaving early does when the generator is collected
        follow_up = engine.generate("next", inputs, SamplingParams(max_new_tokens=2, temperature=0))
        result = await follow_up.collect()
        assert result.finish.finish_reason == "length"
        # The abandoned job stopped at its next step: counted as an abort, a few tokens in, not 5000.
        assert engine.stats.finished["abort"] == 1
        assert 2 <= engine.stats.last_aborted_tokens < 5000
    finally:
        await engine.shutdown()


async def test_shutdown_stops_running_and_queued_generations(tiny_vl_dir):
    # A batch of one: the first generation runs, the second waits in the queue.
    engine = await loaded_engine(tiny_vl_dir, max_batch_size=1)
    inputs = await engine.prepare([ChatTurn("user", ["你好"])])
    params = SamplingParams(max_new_tokens=8000, temperature=0, ignore_eos=True)
    streams = [engine.generate(f"r{i}", inputs, params) for i in range(2)]
    collecting = [asyncio.ensure_future(stream.collect()) for stream in streams]
    scheduler = engine.scheduler
    await wait_for(lambda: scheduler.running == 1 and scheduler.waiting == 1 and scheduler.decode_steps >= 2)
    await engine.shutdown()
    running, queued = [result.finish for result in await asyncio.gather(*collecting)]
    assert (running.finish_reason, queued.finish_reason) == ("abort", "abort")
    assert 0 < running.completion_tokens < 8000 and queued.completion_tokens == 0
    assert engine.stats.finished == {"stop": 0, "length": 0, "abort": 2}
