"""Test helpers: steering the tiny model's output through a forward hook, and parsing SSE by hand."""

from __future__ import annotations

import json

import torch


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
