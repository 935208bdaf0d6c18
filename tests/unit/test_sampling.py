"""Penalties, filters and per-request random generators."""

import math

import torch

from backend.engines.transformers_engine.sampling import (
    SamplingParams,
    apply_penalties,
    choose_token,
    filter_logits,
    make_generator,
)

EMPTY = torch.tensor([], dtype=torch.long)


def params(**values):
    return SamplingParams(max_new_tokens=8, **values)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([2.0, -2.0, 2.0, 1.0])
    out = apply_penalties(logits, torch.tensor([0]), torch.tensor([1]), params(repetition_penalty=2.0))
    assert out.tolist() == [1.0, -4.0, 2.0, 1.0]


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.zeros(4)
    out = apply_penalties(logits, EMPTY, torch.tensor([2, 2, 3]), params(presence_penalty=0.5, frequency_penalty=0.25))
    assert out.tolist() == [0.0, 0.0, -1.0, -0.75]


def test_prompt_tokens_do_not_count_for_openai_penalties():
    out = apply_penalties(torch.zeros(3), torch.tensor([1]), EMPTY, params(presence_penalty=1.0))
    assert out.tolist() == [0.0, 0.0, 0.0]


def test_top_k_keeps_the_k_best():
    out = filter_logits(torch.tensor([1.0, 4.0, 3.0, 2.0]), params(top_k=2))
    assert [math.isinf(value) for value in out.tolist()] == [True, False, False, True]


def test_top_p_keeps_the_smallest_set_reaching_p_and_always_the_best():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = ~torch.isinf(filter_logits(logits.clone(), params(top_p=0.75)))
    assert kept.tolist() == [True, True, False, False]
    kept = ~torch.isinf(filter_logits(logits.clone(), params(top_p=0.1)))
    assert kept.tolist() == [True, False, False, False]


def test_min_p_drops_tokens_far_below_the_best():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    kept = ~torch.isinf(filter_logits(logits, params(min_p=0.2)))
    assert kept.tolist() == [True, True, False, False]


def test_temperature_zero_is_greedy():
    logits = torch.tensor([0.1, 3.0, 2.9])
    generator = make_generator(1, torch.device("cpu"))
    assert choose_token(logits, EMPTY, EMPTY, params(temperature=0.0), generator) == 1


def test_a_seed_reproduces_samples_and_leaves_the_global_rng_alone():
    logits = torch.zeros(1000)
    torch.manual_seed(0)
    expected_global = torch.rand(1)
    torch.manual_seed(0)
    first = [choose_token(logits.clone(), EMPTY, EMPTY, params(), make_generator(42, torch.device("cpu")))]
    second = [choose_token(logits.clone(), EMPTY, EMPTY, params(), make_generator(42, torch.device("cpu")))]
    assert torch.rand(1) == expected_global
    assert first == second
    draws = {
        choose_token(logits.clone(), EMPTY, EMPTY, params(), make_generator(s, torch.device("cpu"))) for s in range(20)
    }
    assert len(draws) > 10
