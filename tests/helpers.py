"""Test helpers: steering (and pausing) the tiny model through a forward hook, waiting on the engine's state
instead of sleeping, parsing SSE and the server's log by hand, and tools a test needs (a failure under CI)."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import shutil
import threading
import time

import pytest
import torch


def in_ci() -> bool:
    """Whether this run is CI's (`CI=true`, as GitHub Actions and most CI services set it)."""
    return os.environ.get("CI", "").strip().lower() == "true"


def missing(reason: str) -> None:
    """Skip the test on a developer's machine; under CI fail it, so a missing tool cannot leave CI green."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing tool fails the run instead of skipping)", pytrace=False)
    pytest.skip(reason)


def require_tool(*names: str) -> str:
    """The path of the first of `names` on PATH; otherwise the test is skipped (failed under CI)."""
    for name in names:
        if path := shutil.which(name):
            return path
    missing(f"{' or '.join(names)} is not installed")
    raise AssertionError("unreachable")


def require_module(name: str):
    """Import `name`; if it is not installed the test is skipped (failed under CI)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"the Python module {name} is not installed")
        raise


async def loaded_engine(model_dir, **overrides):
    """A transformers engine on a tiny checkpoint, started and ready (the caller shuts it down)."""
    from backend.engines.transformers_engine.engine import TransformersEngine
    from tests.conftest import make_settings

    engine = TransformersEngine(make_settings(model_dir, **overrides))
    await engine.start()
    await engine.wait_until_loaded()
    assert engine.state == "ready"
    return engine


async def wait_until_idle(engine, timeout: float = 60.0) -> None:
    """Wait until nothing is queued or running, e.g. before an LmHeadHook counts calls or a snapshot of the
    metrics is taken: the session's shared engine may still be finishing an earlier test's request (its
    answer can reach the client a step before its row leaves the batch)."""
    await wait_for(lambda: engine.scheduler.running == 0 and engine.scheduler.waiting == 0, timeout, "an idle engine")


async def wait_for(condition, timeout: float = 60.0, what: str = "the condition") -> None:
    """Poll `condition()` on the event loop until it is true (a deadline only against hanging forever)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.005)


class Gate:
    """A point where the inference thread stops until the test opens it, so that "the model is in the middle
    of a request" is a fact the test waits for (`reached`), not a guess made with a sleep.

    Call `stop_here()` from an LmHeadHook action (it runs on the inference thread). If the test never opens
    the gate, the wait ends after `timeout` with an error, which fails the request instead of hanging.
    """

    def __init__(self, timeout: float = 60.0) -> None:
        self.reached = threading.Event()
        self.opened = threading.Event()
        self._timeout = timeout

    def stop_here(self) -> None:
        """Called on the inference thread: say it has arrived, then wait for the test to open the gate."""
        self.reached.set()
        if not self.opened.wait(self._timeout):
            raise AssertionError("the test never opened the gate")

    def open(self) -> None:
        """Let the inference thread go on."""
        self.opened.set()

    async def wait_reached(self, timeout: float = 60.0) -> None:
        """Wait (without blocking the event loop) until the inference thread stands at the gate."""
        await wait_for(self.reached.is_set, timeout, "the inference thread to reach the gate")


class LmHeadHook:
    """Replace the output of the model's `lm_head` (its logits) with `action(call_index, logits)`.

    The model still runs for real; only what it says is chosen by the test, e.g. a Chinese sentence whose
    characters are split over byte tokens, or NaN logits at a given step.
    """

    def __init__(self, model, action):
        self._model = model
        self._action = action
        self.calls = 0

    def _hook(self, module, args, output):
        result = self._action(self.calls, output)
        self.calls += 1
        return result

    def __enter__(self):
        self._handle = self._model.lm_head.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def forcing(token_ids: list[int], end_token: int):
    """An LmHeadHook action that makes greedy decoding emit `token_ids`, then `end_token`."""

    def action(call: int, logits: torch.Tensor) -> torch.Tensor:
        wanted = token_ids[call] if call < len(token_ids) else end_token
        forced = torch.full_like(logits, -10.0)
        forced[..., wanted] = 10.0
        return forced

    return action


def parse_sse(raw: str) -> list[dict | str]:
    """Split an SSE body into its events: a dict per JSON `data:`, "[DONE]", or ":comment" strings."""
    events: list[dict | str] = []
    for block in raw.split("\n\n"):
        if not block:
            continue
        for line in block.split("\n"):
            if line.startswith(":"):
                events.append(line)
            elif line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
            else:
                raise AssertionError(f"not an SSE line: {line!r}")
    return events


# The request-context middleware's line, as the text formatter writes it (backend/logging_setup.py):
# `<time> INFO backend.access: request request_id=... method=POST route=/v1/... status=200 total_ms=12.3 ...`.
# The route comes before `status=` and is the client's path, so the status is the last ` status=NNN total_ms=`.
_TEXT_ACCESS = re.compile(r" INFO backend\.access: request ")
_TEXT_STATUS = re.compile(r" status=(\d{3}) total_ms=")
_TEXT_LEVEL = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (ERROR|CRITICAL) ")


def _json_entry(line: str) -> dict | None:
    """A json-format record as a dict ({} if it does not parse), or None for a text-format line."""
    if not line.startswith("{"):
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return {}


def _access_status(line: str, entry: dict | None) -> int | None:
    """The status of a request line (either format), or None for any other line."""
    if entry is not None:
        return int(entry["status"]) if entry.get("logger") == "backend.access" else None
    if not _TEXT_ACCESS.search(line):
        return None
    found = _TEXT_STATUS.findall(line)
    assert found, f"a request line without a status this parser reads: {line}"
    return int(found[-1])


def access_log_statuses(log: str) -> list[int]:
    """The HTTP status of every request line in a server log, in either LOG_FORMAT (text or json).

    Each request line must carry a status this parser can read: a line it cannot read is an error here, so
    a change of the log's format cannot make a "no 5xx in the log" check pass by finding nothing.
    """
    statuses = (_access_status(line, _json_entry(line)) for line in log.splitlines())
    return [status for status in statuses if status is not None]


def server_error_lines(log: str) -> list[str]:
    """Lines of a server log that show a server-side failure: a request answered 5xx, a record logged at
    ERROR or CRITICAL (uvicorn's "Exception in ASGI application" is one), or a traceback (the text format
    indents traceback lines)."""
    bad = []
    for line in log.splitlines():
        entry = _json_entry(line)
        status = _access_status(line, entry)
        if (
            (entry is not None and (entry.get("level") in ("error", "critical") or "exception" in entry))
            or _TEXT_LEVEL.match(line)
            or line.lstrip().startswith("Traceback (most recent call last)")
            or (status is not None and status >= 500)
        ):
            bad.append(line)
    return bad
