"""The sampler/trainer importance-sampling correction against a plain-loop oracle of TRL's
definitions (GRPOTrainer's vllm_importance_sampling_mode, clip_max and clip_min)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlxpost.algorithms.importance import MODES, importance_weights


def oracle(trainer, sampler, mask, mode, cap_max, cap_min):
    rows, width = mask.shape
    weights = np.zeros((rows, width))
    for b in range(rows):
        tokens = [t for t in range(width) if mask[b, t] > 0]
        sequence_log_ratio = sum(trainer[b, t] - sampler[b, t] for t in tokens)
        for t in tokens:
            log_ratio = (
                sequence_log_ratio if mode.startswith("sequence") else trainer[b, t] - sampler[b, t]
            )
            ratio = math.exp(log_ratio)
            low = -math.inf if cap_min is None else cap_min
            if mode.endswith("truncate"):
                weights[b, t] = min(max(ratio, low), cap_max)
            else:
                weights[b, t] = ratio if low <= ratio <= cap_max else 0.0
    return weights


def logprob_pair(seed=0, rows=5, width=7):
    rng = np.random.default_rng(seed)
    sampler = -rng.uniform(0.1, 3.0, size=(rows, width))
    trainer = sampler + rng.normal(0, 0.4, size=(rows, width))
    mask = np.zeros((rows, width))
    mask[:, 2:] = 1
    mask[1, 5:] = 0  # a shorter completion
    mask[3] = 0  # a row with no counted token
    return (trainer * mask).astype(np.float32), (sampler * mask).astype(np.float32), mask


@pytest.mark.parametrize("mode", MODES[1:])
@pytest.mark.parametrize("cap_min", [None, 0.8])
def test_weights_match_the_oracle(mode, cap_min):
    trainer, sampler, mask = logprob_pair()
    cap_max = 1.3
    weights, metrics = importance_weights(trainer, sampler, mask, mode, cap_max, cap_min)
    expected = oracle(trainer, sampler, mask, mode, cap_max, cap_min)
    np.testing.assert_allclose(weights, expected, rtol=1e-6, atol=1e-7)
    counted = mask > 0
    ratios = np.exp((trainer - sampler).astype(np.float64))[counted]
    if mode.startswith("sequence"):
        ratios = np.exp(((trainer - sampler) * mask).sum(axis=1))[counted.any(axis=1)]
    clipped_or_masked = ((ratios > cap_max) | (ratios < (cap_min or 0))).any()
    assert clipped_or_masked, "the caps were not exercised"
    assert metrics["importance_ratio_max"] == pytest.approx(ratios.max(), rel=1e-6)
    assert metrics["importance_ratio_min"] == pytest.approx(ratios.min(), rel=1e-6)
    gap = np.abs(trainer - sampler)[counted]
    assert metrics["sampler_gap"] == pytest.approx(gap.mean(), rel=1e-6)
    assert metrics["sampler_gap_max"] == pytest.approx(gap.max(), rel=1e-6)
    if mode.endswith("mask"):
        masked = ((ratios > cap_max) | (ratios < (cap_min or -1))).mean()
        assert metrics["importance_masked"] == pytest.approx(masked)


def test_matching_logprobs_weigh_one():
    _, sampler, mask = logprob_pair()
    for mode in MODES[1:]:
        weights, metrics = importance_weights(sampler, sampler, mask, mode, 3.0)
        np.testing.assert_array_equal(weights, mask)
        assert metrics["sampler_gap"] == 0.0


def test_floor_must_be_below_the_cap():
    from mlxpost.algorithms.grpo import GRPOConfig
    from mlxpost.errors import UserError

    with pytest.raises(UserError, match="--importance-floor"):
        GRPOConfig(importance_correction="token_mask", importance_cap=2.0, importance_floor=2.0)
