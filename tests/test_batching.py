"""``kd_cache.batching.plan_batches``: every sample once, windows never mixed, the budget kept, and
deterministic; the padding it saves on a skewed length distribution."""

from __future__ import annotations

import random

import pytest

from kd_cache.batching import MAX_PADDING, padding_of, plan_batches


def _lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([rng.randint(90, 200), rng.randint(600, 700), rng.randint(800, 2400)]) for _ in range(n)]


def test_fixed_batches_are_data_order():
    assert plan_batches([5] * 7, batch_size=3) == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.parametrize("window", [1, 5, 16, 117])
def test_token_budget_plan(window):
    lengths = _lengths(117)
    budget = 4096
    plan = plan_batches(lengths, batch_size=8, max_batch_tokens=budget, window=window)
    assert sorted(i for b in plan for i in b) == list(range(117))  # every sample exactly once
    for b in plan:
        assert len({i // window for i in b}) == 1  # a batch never mixes windows
        longest = max(lengths[i] for i in b)
        assert len(b) * longest <= budget or len(b) == 1  # a sample over the budget goes alone
        assert len(b) * longest - sum(lengths[i] for i in b) <= MAX_PADDING * len(b) * longest
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    assert plan == plan_batches(list(lengths), batch_size=8, max_batch_tokens=budget, window=window)


def test_sorting_cuts_padding():
    lengths = _lengths(512, seed=1)
    fixed = padding_of(lengths, plan_batches(lengths, batch_size=8))
    budget = padding_of(lengths, plan_batches(lengths, batch_size=8, max_batch_tokens=8 * 1024, window=128))
    assert fixed.real == budget.real == sum(lengths)
    assert budget.fraction < 0.05 < 0.3 < fixed.fraction
    assert budget.largest <= 8 * 1024 < fixed.largest
