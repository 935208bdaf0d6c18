"""Choosing the next token: penalties, temperature, top-k, top-p, min-p, and a per-request random generator.

Each request samples with its own `torch.Generator`, seeded from its `seed` (or at random), so a seeded
request is reproducible and never touches the global RNG that other requests use.
"""

from __future__ import annotations

import secrets

import torch

from backend.engines.requests import SamplingParams


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A private random generator for one request, on the device where its logits live."""
    generator = torch.Generator(device=device)
    # torch takes seeds in [0, 2**64); any integer (a negative seed, or seed + choice index past 2**63) is
    # folded into that range rather than raising on the inference thread.
    generator.manual_seed(seed % 2**64 if seed is not None else secrets.randbits(63))
    return generator


def apply_penalties(
    logits: torch.Tensor, prompt_ids: torch.Tensor, output_ids: torch.Tensor, params: SamplingParams
) -> torch.Tensor:
    """Penalise repeated tokens in one row of logits (shape `[vocab]`).

    - `repetition_penalty` (transformers' / CTRL's): tokens seen in the prompt or the answer have positive
      logits divided and negative logits multiplied by the penalty.
    - `presence_penalty` / `frequency_penalty` (OpenAI's definition): subtract `presence` once and
      `frequency` per occurrence from tokens already in the answer.
    """
    if params.repetition_penalty != 1.0:
        seen = torch.unique(torch.cat([prompt_ids, output_ids]))
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_ids.numel():
        counts = torch.bincount(output_ids, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p: tokens cut away get -inf."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the best token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def choose_token(
    logits: torch.Tensor,
    prompt_ids: torch.Tensor,
    output_ids: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
) -> int:
    """The next token id for one sequence, from its last-position logits (float32, shape `[vocab]`)."""
    logits = apply_penalties(logits, prompt_ids, output_ids, params)
    if params.greedy:
        return int(torch.argmax(logits))
    probs = filter_logits(logits, params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
