"""The comparison functions behind `mlxpost parity`, on synthetic arrays (no backend needed)."""

from __future__ import annotations

import numpy as np

from mlxpost.backend import OptimConfig
from mlxpost.parity import adamw_first_step, compare_greedy

RTOL = 1e-2  # bfloat16's: tolerance 0.1 for logprobs whose largest magnitude is 10
VOCAB = 6


def logprobs(values: dict[int, float]) -> np.ndarray:
    """A (V,) logprob row: the given tokens, the rest at -10."""
    row = np.full(VOCAB, -10.0)
    for token, value in values.items():
        row[token] = value
    return row


def greedy(ref_ids, other_ids, ref_row, other_row):
    """compare_greedy where every divergence sees the same pair of logprob rows."""
    calls = []

    def next_logprobs(row, col):
        calls.append((row, col))
        return ref_row, other_row

    return compare_greedy("greedy", ref_ids, other_ids, next_logprobs, RTOL), calls


def test_identical_tokens_pass_without_looking_at_logprobs():
    ids = np.array([[1, 2, 3], [4, 4, 5]])
    check, calls = greedy(ids, ids.copy(), None, None)
    assert check.ok and check.max_abs_diff == 0 and calls == []
    assert check.detail == "6/6 tokens equal"


def test_a_near_tie_may_break_either_way_and_ends_the_row():
    """Tokens 2 and 3 within 0.02 < 0.1 of each other: each backend takes its own."""
    ref_ids = np.array([[1, 2, 2, 2], [5, 5, 5, 5]])
    other_ids = np.array([[1, 3, 4, 0], [5, 5, 5, 5]])  # differs from token 1 on
    check, calls = greedy(
        ref_ids, other_ids, logprobs({2: -1.00, 3: -1.02}), logprobs({2: -1.01, 3: -0.99})
    )
    assert check.ok, check.detail
    assert calls == [(0, 1)]  # only the first difference is examined
    assert np.isclose(check.max_abs_diff, 0.02) and check.tolerance == RTOL * 10
    assert check.detail.startswith("5/8 tokens equal; row 0 token 1: 2 vs 3, margin 0.02 <= 0.1")


def test_a_clear_divergence_fails():
    """The reference prefers its token by 1.5 nats: the other backend's choice is wrong."""
    ref_ids, other_ids = np.array([[1, 2, 2]]), np.array([[1, 3, 3]])
    check, _ = greedy(
        ref_ids, other_ids, logprobs({2: -0.5, 3: -2.0}), logprobs({2: -0.5, 3: -2.0})
    )
    assert not check.ok and np.isclose(check.max_abs_diff, 1.5)
    assert "margin 1.5 > 0.1 (clear)" in check.detail


def test_a_token_its_own_backend_ranks_clearly_lower_fails():
    """A tie in the reference, but the other backend picked a token it scores 1 nat lower."""
    ref_ids, other_ids = np.array([[2]]), np.array([[3]])
    check, _ = greedy(
        ref_ids, other_ids, logprobs({2: -1.0, 3: -1.0}), logprobs({2: -0.5, 3: -1.5})
    )
    assert not check.ok and np.isclose(check.max_abs_diff, 1.0)


def test_every_row_is_judged():
    """A near-tie in one row does not excuse a clear divergence in another."""
    rows = {0: (logprobs({1: -1.0, 2: -1.01}),) * 2, 1: (logprobs({1: -0.2, 2: -3.0}),) * 2}
    check = compare_greedy(
        "greedy",
        np.array([[1, 1], [1, 1]]),
        np.array([[2, 2], [1, 2]]),
        lambda row, col: rows[row],
        RTOL,
    )
    assert not check.ok
    assert "row 0 token 0: 1 vs 2, margin 0.01 <= 0.1" in check.detail
    assert "row 1 token 1: 1 vs 2, margin 2.8 > 0.1 (clear)" in check.detail


def test_adamw_first_step_is_lr_g_over_abs_g_whatever_the_betas():
    """Bias correction cancels the betas in the first update; they show in the moments."""
    weights = np.array([1.0, -2.0, 0.5, 0.25])
    grads = np.array([3.0, -1e-4, 1e-8, 0.0])
    update = 1e-3 * np.array([3 / (3 + 1e-8), -1e-4 / (1e-4 + 1e-8), 0.5, 0.0])
    expected = weights * (1 - 1e-3 * 0.1) - update
    for beta1, beta2 in ((0.9, 0.999), (0.5, 0.9)):
        cfg = OptimConfig(
            learning_rate=1e-3, weight_decay=0.1, eps=1e-8, beta1=beta1, beta2=beta2, warmup_steps=0
        )
        updated, m, v = adamw_first_step(weights, grads, cfg, cfg.learning_rate)
        np.testing.assert_allclose(updated, expected, rtol=1e-12)
        np.testing.assert_allclose(m, (1 - beta1) * grads)
        np.testing.assert_allclose(v, (1 - beta2) * grads**2)
