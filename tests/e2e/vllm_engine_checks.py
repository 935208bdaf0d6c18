"""Run by tests/e2e/test_engines.py with .venv-vllm's Python (vLLM is installed there, pytest is not): the
vLLM engine's request driving against a stand-in for `AsyncLLM`, with vLLM's own exception classes and
output types. Prints one JSON object of findings; the test asserts on it.

The stand-in plays what a real engine core rarely does on cue: refuse an input, die mid-answer, end a request
with `finish_reason="error"`, outlast the deadline, or be cancelled before the request was added.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError  # noqa: E402

from backend.engines.checkpoint import CheckpointInfo  # noqa: E402
from backend.engines.client import ServedModel  # noqa: E402
from backend.engines.events import Failed, Finished, TextDelta  # noqa: E402
from backend.engines.requests import SamplingParams  # noqa: E402
from backend.engines.vllm_engine.engine import VllmEngine, VllmPrompt  # noqa: E402
from backend.media.resize import PixelBounds  # noqa: E402
from backend.settings import Settings  # noqa: E402


def output(request_id: str, token_ids: list[int], text: str, finish: str | None, stop_reason=None) -> RequestOutput:
    completion = CompletionOutput(
        index=0,
        text=text,
        token_ids=token_ids,
        cumulative_logprob=None,
        logprobs=None,
        finish_reason=finish,
        stop_reason=stop_reason,
    )
    return RequestOutput(request_id, None, [1, 2, 3], None, [completion], finish is not None)


class StandInLLM:
    """What VllmEngine uses of AsyncLLM, scripted per request id."""

    errored = False
    dead_error = EngineDeadError()

    def __init__(self) -> None:
        self.aborted: list[str] = []
        self.unfinished = 0

    async def generate(self, prompt, sampling, request_id):
        script = request_id.split("-")[0]
        if script == "refused":
            raise EngineGenerateError() from ValueError("the encoder cache is too small for this image")
        if script == "invalid":
            raise VLLMValidationError("max_tokens is too large", parameter="max_tokens")
        if script == "dead":
            yield output(request_id, [5], "半", None)
            self.errored = True
            raise EngineDeadError()
        if script == "error":
            yield output(request_id, [5], "半", "error")
            return
        if script == "eos":  # an answer ended by an end token, which vLLM counts in token_ids
            yield output(request_id, [5, 6], "气虚", None)
            yield output(request_id, [151645], "", "stop", None)
            return
        if script == "stopstring":
            yield output(request_id, [5, 6], "气虚", "stop", "。")
            return
        self.unfinished += 1
        try:
            while True:  # "slow": never ends by itself
                yield output(request_id, [7], "慢", None)
                await asyncio.sleep(0.01)
        finally:
            self.unfinished -= 1

    async def abort(self, request_id):
        self.aborted.append(request_id)

    def get_num_unfinished_requests(self) -> int:
        return self.unfinished


async def run(request_id: str, engine: VllmEngine, cancel_after: float | None = None) -> dict:
    prompt = VllmPrompt(token_ids=[1, 2, 3], bounds=PixelBounds(3136, 151200))
    [stream] = engine.generate_many([(request_id, SamplingParams(max_new_tokens=50))], prompt)
    events = []
    reader = asyncio.ensure_future(drain(stream, events))
    if cancel_after is not None:
        if cancel_after:
            await asyncio.sleep(cancel_after)
        stream.cancel()  # with no wait: before the request's task has run at all
    await asyncio.wait_for(reader, 10)
    finals = [event for event in events if not isinstance(event, TextDelta)]
    final = finals[-1]
    return {
        "finals": len(finals),
        "kind": type(final).__name__,
        "reason": getattr(final, "finish_reason", None),
        "tokens": getattr(final, "completion_tokens", None),
        "error": type(final.error).__name__ if isinstance(final, Failed) else None,
        "status": getattr(getattr(final, "error", None), "status_code", None),
        "code": getattr(getattr(final, "error", None), "code", None),
        "in_flight": len(engine._tasks),
    }


async def drain(stream, events: list) -> None:
    """Every event of the stream, final one included (a failure is recorded, not raised)."""
    queue = stream._queue
    while True:
        event = await queue.get()
        events.append(event)
        if isinstance(event, Finished | Failed):
            return


async def main() -> None:
    settings = Settings(_env_file=None, model_id="/nonexistent", request_timeout_seconds=0.3)
    results = {}
    for name in ("refused", "invalid", "error", "eos", "stopstring", "slow", "cancelled", "early", "dead"):
        engine = VllmEngine(settings)
        engine._llm = StandInLLM()
        engine._checkpoint = CheckpointInfo(Path("/"), None, None, None, "", frozenset({151645}), None, 4096, None)
        engine._model = ServedModel(max_model_len=4096, accepts_images=False)
        engine.state = "ready"
        cancel_after = {"cancelled": 0.05, "early": 0.0}.get(name)
        results[name] = await run(f"{name}-0", engine, cancel_after)
        results[name]["aborted"] = engine._llm.aborted
        results[name]["unfinished"] = engine._llm.get_num_unfinished_requests()
        results[name]["state"] = engine.state
    print(json.dumps(results))


asyncio.run(main())
