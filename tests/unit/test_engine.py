"""The engine: one inference thread, streams back on the event loop, cancellation and shutdown."""

import asyncio
import threading

from backend.engine.engine import Engine
from backend.engine.prompt import ChatTurn
from backend.engine.sampling import SamplingParams
from tests.conftest import make_settings


async def loaded_engine(model_dir):
    engine = Engine(make_settings(model_dir))
    await engine.start()
    await engine.wait_until_loaded()
    assert engine.state == "ready"
    return engine


async def test_generation_runs_on_one_named_inference_thread(tiny_vl_dir):
    engine = await loaded_engine(tiny_vl_dir)
    seen = set()
    original = engine.loaded.model.forward

    def spy(*args, **kwargs):
        seen.add(threading.current_thread().name)
        return original(*args, **kwargs)

    engine.loaded.model.forward = spy
    try:
        inputs = await engine.build_inputs([ChatTurn("user", ["你好"])])
        streams = [engine.generate(f"r{i}", inputs, SamplingParams(max_new_tokens=3, temperature=0)) for i in range(3)]
        results = await asyncio.gather(*(stream.collect() for stream in streams))
    finally:
        del engine.loaded.model.forward
        await engine.shutdown()
    assert [result.finish.completion_tokens for result in results] == [3, 3, 3]
    assert len(seen) == 1 and next(iter(seen)).startswith("inference")
    assert threading.current_thread().name not in seen


async def test_leaving_a_stream_early_cancels_its_generation(tiny_vl_dir):
    engine = await loaded_engine(tiny_vl_dir)
    try:
        inputs = await engine.build_inputs([ChatTurn("user", ["你好"])])
        stream = engine.generate("r", inputs, SamplingParams(max_new_tokens=5000, temperature=0))
        async for delta in stream.events():
            if delta.completion_tokens >= 2:
                break
        follow_up = engine.generate("next", inputs, SamplingParams(max_new_tokens=2, temperature=0))
        result = await follow_up.collect()
        # The abandoned job stopped at its next step, so the next one ran and finished normally.
        assert result.finish.finish_reason == "length"
        assert result.finish.queue_seconds < 60
    finally:
        await engine.shutdown()


async def test_shutdown_stops_running_and_queued_generations(tiny_vl_dir):
    engine = await loaded_engine(tiny_vl_dir)
    inputs = await engine.build_inputs([ChatTurn("user", ["你好"])])
    streams = [engine.generate(f"r{i}", inputs, SamplingParams(max_new_tokens=8000, temperature=0)) for i in range(2)]
    collecting = [asyncio.ensure_future(stream.collect()) for stream in streams]
    await asyncio.sleep(0.2)
    await engine.shutdown()
    results = await asyncio.gather(*collecting)
    assert [result.finish.finish_reason for result in results] == ["abort", "abort"]
    assert all(result.finish.completion_tokens < 8000 for result in results)
