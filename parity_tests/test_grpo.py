"""GRPO's math against independent numpy oracles, and one update across backends."""

from __future__ import annotations

import itertools
from functools import partial

import numpy as np
import pytest

from mlxpost.algorithms.grpo import GRPOConfig, group_advantages, grpo_loss
from mlxpost.functional import LogitsForward


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def oracle_loss(logits, batch, cfg):
    """The GRPO/DAPO/GSPO/Dr. GRPO objective written out row by row, token by token."""
    ids, mask = batch["input_ids"], batch["loss_mask"]
    rows, width = ids.shape
    logp = np.zeros((rows, width))
    for b in range(rows):
        for t in range(1, width):
            logp[b, t] = log_softmax(logits[b, t - 1].astype(np.float64) / cfg.temperature)[
                ids[b, t]
            ]
    per_token = np.zeros((rows, width))
    for b in range(rows):
        tokens = [t for t in range(width) if mask[b, t] > 0]
        if cfg.importance == "sequence":
            seq = (
                np.mean([logp[b, t] - batch["old_logprobs"][b, t] for t in tokens])
                if tokens
                else 0.0
            )
        for t in tokens:
            log_ratio = (
                seq if cfg.importance == "sequence" else logp[b, t] - batch["old_logprobs"][b, t]
            )
            ratio = np.exp(log_ratio)
            advantage = batch["advantages"][b]
            clipped = min(max(ratio, 1 - cfg.clip_low), 1 + cfg.clip_high)
            value = max(-advantage * ratio, -advantage * clipped)
            if "importance_weights" in batch:
                value *= batch["importance_weights"][b, t]
            log_r = logp[b, t] - batch["ref_logprobs"][b, t]
            k3 = np.exp(-log_r) - 1 + log_r
            per_token[b, t] = value + cfg.kl_beta * k3
    if cfg.aggregation == "grpo":
        means = [per_token[b][mask[b] > 0].mean() if mask[b].sum() else 0.0 for b in range(rows)]
        return float(np.mean(means))
    return float(per_token[mask > 0].sum() / batch["normaliser"])


ROW_SHIFTS = np.array([[-0.5], [0.0], [0.0], [0.5]])


def random_batch(seed=0, rows=4, width=9, vocab=11):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, size=(rows, width, vocab)).astype(np.float32)
    ids = rng.integers(0, vocab, size=(rows, width)).astype(np.int32)
    mask = np.zeros((rows, width), np.float32)
    mask[:, 4:] = 1.0
    mask[1, 7:] = 0.0  # a shorter completion
    logp = log_softmax(logits[:, :-1] / 0.8)
    aligned = np.zeros((rows, width), np.float32)
    aligned[:, 1:] = np.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    batch = {
        "input_ids": ids,
        "attention_mask": np.ones((rows, width), np.int32),
        "loss_mask": mask,
        # old/ref logprobs near the current ones, so some ratios clip and some do not; the
        # row shifts push the sequence-level (GSPO) ratios of rows 0 and 3 out of the clip
        # range on the side where clipping is active for their advantage's sign
        "old_logprobs": (
            (aligned + rng.normal(0, 0.3, size=aligned.shape) + ROW_SHIFTS[:rows]) * mask
        ).astype(np.float32),
        "ref_logprobs": ((aligned + rng.normal(0, 0.2, size=aligned.shape)) * mask).astype(
            np.float32
        ),
        "advantages": np.array([1.0, -0.5, 0.7, -1.2], np.float32)[:rows],
        "normaliser": np.float32(mask.sum()),
    }
    return logits, batch


CASES = [
    dict(aggregation="grpo"),
    dict(aggregation="bnpo"),
    dict(aggregation="dr_grpo"),
    dict(aggregation="dapo", clip_low=0.2, clip_high=0.28),
    dict(importance="sequence"),
    dict(kl_beta=0.1),
]


@pytest.mark.parametrize(
    "overrides", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
def test_loss_matches_the_oracle_on_every_backend(overrides, array_backends):
    cfg = GRPOConfig(temperature=0.8, **overrides)
    logits, batch = random_batch()
    expected = oracle_loss(logits, batch, cfg)
    for (name, ops, convert), chunk in itertools.product(array_backends, (None, 5)):
        forward = LogitsForward(ops, convert(logits), chunk=chunk)  # 32 rows: 7 chunks of 5
        loss, metrics = grpo_loss(ops, forward, {k: convert(v) for k, v in batch.items()}, cfg)
        got = float(ops.to_numpy(loss))
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), f"{name}: {got} vs {expected}"
        clip = float(ops.to_numpy(metrics["clip_fraction"]))
        assert 0.0 < clip < 1.0, f"{name}: clipping not exercised ({clip})"


def test_importance_weights_scale_each_token_surrogate(array_backends):
    cfg = GRPOConfig(temperature=0.8, kl_beta=0.1)
    logits, batch = random_batch()
    weights = np.random.default_rng(3).uniform(0.0, 2.0, size=batch["loss_mask"].shape)
    batch["importance_weights"] = (weights * batch["loss_mask"]).astype(np.float32)
    expected = oracle_loss(logits, batch, cfg)
    for name, ops, convert in array_backends:
        forward = LogitsForward(ops, convert(logits))
        loss, _ = grpo_loss(ops, forward, {k: convert(v) for k, v in batch.items()}, cfg)
        got = float(ops.to_numpy(loss))
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), f"{name}: {got} vs {expected}"


def oracle_advantages(rewards, group, scale, std="bessel", eps=1e-4):
    """TRL 1.16's GRPOTrainer advantages: (r - group mean) / (torch.std + 1e-4), torch.std
    being Bessel-corrected, over the group (scale_rewards="group") or the whole batch
    ("batch"); std="population" is mlxpost's other option (divides by n)."""
    correction = 1 if std == "bessel" else 0

    def spread(values):
        mean = sum(values) / len(values)
        return (sum((v - mean) ** 2 for v in values) / (len(values) - correction)) ** 0.5

    out = []
    for start in range(0, len(rewards), group):
        chunk = list(rewards[start : start + group])
        mean = sum(chunk) / group
        for r in chunk:
            if scale == "group":
                out.append((r - mean) / (spread(chunk) + eps))
            elif scale == "batch":
                out.append((r - mean) / (spread(list(rewards)) + eps))
            else:
                out.append(r - mean)
    return np.array(out)


@pytest.mark.parametrize("std", ["bessel", "population"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages(scale, std):
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(
        group_advantages(rewards, 4, scale, std),
        oracle_advantages(rewards, 4, scale, std),
        rtol=1e-12,
    )
    # a group whose rewards are all equal carries no signal
    assert np.all(group_advantages(rewards, 4, scale, std)[4:8] == 0)


def test_default_advantages_are_trls():
    """TRL's torch.std of [1, 0, 0, 1] is 0.57735 (n - 1), not the population's 0.5."""
    cfg = GRPOConfig()
    assert cfg.advantage_std == "bessel"
    advantages = group_advantages(np.array([1.0, 0.0, 0.0, 1.0]), 4, "group", cfg.advantage_std)
    np.testing.assert_allclose(advantages, np.array([0.5, -0.5, -0.5, 0.5]) / (0.5773502692 + 1e-4))


def test_rank_advantages():
    rewards = np.array([3.0, 1.0, 2.0, 2.0])
    # ranks 3, 0, 1.5, 1.5 (ties averaged), centred at 1.5 and scaled by 1.5
    np.testing.assert_allclose(group_advantages(rewards, 4, "rank"), [1.0, -1.0, 0.0, 0.0])


def test_one_update_matches_across_backends(one_update, tiny_dir):
    """Fixed rollouts and weights: the same loss and the same updated LoRA weights."""
    cfg = GRPOConfig(temperature=1.0, kl_beta=0.05, clip_high=0.28)
    rng = np.random.default_rng(0)
    rows, prompt, completion = 4, 6, 8
    ids = rng.integers(3, 300, size=(rows, prompt + completion)).astype(np.int32)
    loss_mask = np.zeros(ids.shape, np.float32)
    loss_mask[:, prompt:] = 1.0
    loss_mask[2, prompt + 5 :] = 0.0

    def make_batch(backend, model):
        current = backend.logprobs(model, ids, np.ones_like(ids))

        def noisy(scale):
            return ((current + rng.normal(0, scale, size=current.shape)) * loss_mask).astype(
                np.float32
            )

        return {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "loss_mask": loss_mask,
            "old_logprobs": noisy(0.2),
            "ref_logprobs": noisy(0.1),
            "advantages": np.array([1.0, -1.0, 0.5, -0.5], np.float32),
            "normaliser": np.float32(loss_mask.sum()),
        }

    keys = ("loss", "clip_fraction", "kl", "entropy", "grad_norm")
    one_update(tiny_dir / "tiny-gpt2", partial(grpo_loss, cfg=cfg), make_batch, keys)
