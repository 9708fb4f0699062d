"""PPO's math: GAE against a plain loop, the loss against a numpy oracle, one update across backends."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from mlxpost.algorithms.ppo import PPOConfig, explained_variance, gae, ppo_loss, whiten
from mlxpost.functional import LogitsForward
from mlxpost.ops import NumpyOps


def gae_loop(rewards, values, lengths, starts, gamma, lam):
    """cleanrl's GAE, one sequence at a time, over its own tokens only."""
    out = np.zeros_like(values, dtype=np.float64)
    for row, (start, length) in enumerate(zip(starts, lengths)):
        last = 0.0
        for t in reversed(range(length)):
            col = start + t
            next_value = values[row, col + 1] if t + 1 < length else 0.0
            delta = rewards[row, col] + gamma * next_value - values[row, col]
            last = delta + gamma * lam * last
            out[row, col] = last
    return out


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_a_plain_loop(gamma, lam):
    rng = np.random.default_rng(0)
    rows, width, start = 5, 12, 3
    lengths = [9, 4, 1, 0, 7]
    mask = np.zeros((rows, width))
    for row, length in enumerate(lengths):
        mask[row, start : start + length] = 1
    rewards = rng.normal(size=(rows, width)) * mask
    values = rng.normal(size=(rows, width)) * mask
    expected = gae_loop(rewards, values, lengths, [start] * rows, gamma, lam)
    np.testing.assert_allclose(
        gae(rewards, values, mask, gamma, lam), expected, rtol=1e-12, atol=1e-12
    )


def test_whiten_and_explained_variance():
    mask = np.array([[0, 1, 1, 1], [0, 1, 1, 0]], float)
    values = np.array([[9.0, 1.0, 2.0, 3.0], [9.0, 4.0, 5.0, 9.0]])
    white = whiten(values, mask)
    assert abs(white[mask > 0].mean()) < 1e-12 and abs(white[mask > 0].std() - 1) < 1e-6
    assert np.all(white[mask == 0] == 0)
    assert explained_variance(values, values, mask) == 1.0
    assert explained_variance(np.zeros_like(values), values, mask) == pytest.approx(0.0)


def oracle_ppo(logits, scores, batch, cfg):
    ids, mask = batch["input_ids"], batch["loss_mask"]
    rows, width = ids.shape
    pg, vf, count = 0.0, 0.0, mask.sum()
    for b in range(rows):
        for t in range(1, width):
            if not mask[b, t]:
                continue
            z = logits[b, t - 1].astype(np.float64) / cfg.temperature
            logp = z[ids[b, t]] - (np.log(np.exp(z - z.max()).sum()) + z.max())
            ratio = np.exp(logp - batch["old_logprobs"][b, t])
            a = batch["advantages"][b, t]
            weight = batch["importance_weights"][b, t] if "importance_weights" in batch else 1.0
            pg += weight * max(
                -a * ratio, -a * min(max(ratio, 1 - cfg.clip_range), 1 + cfg.clip_range)
            )
            value, old = scores[b, t - 1], batch["old_values"][b, t]
            clipped = old + min(max(value - old, -cfg.clip_range_value), cfg.clip_range_value)
            ret = batch["returns"][b, t]
            vf += 0.5 * max((value - ret) ** 2, (clipped - ret) ** 2)
    return pg / count + cfg.vf_coef * vf / count


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "importance_weights"])
def test_ppo_loss_matches_the_oracle(weighted):
    rng = np.random.default_rng(1)
    rows, width, vocab = 3, 8, 7
    logits = rng.normal(0, 2, size=(rows, width, vocab)).astype(np.float32)
    scores = rng.normal(size=(rows, width)).astype(np.float32)
    ids = rng.integers(0, vocab, size=(rows, width))
    mask = np.zeros((rows, width), np.float32)
    mask[:, 3:] = 1
    mask[2, 6:] = 0
    batch = {
        "input_ids": ids,
        "attention_mask": np.ones((rows, width)),
        "loss_mask": mask,
        "old_logprobs": (rng.normal(-2, 0.5, size=(rows, width)) * mask).astype(np.float32),
        "old_values": (rng.normal(size=(rows, width)) * mask).astype(np.float32),
        "advantages": (rng.normal(size=(rows, width)) * mask).astype(np.float32),
        "returns": (rng.normal(size=(rows, width)) * mask).astype(np.float32),
    }
    if weighted:  # the sampler/trainer correction weighs each token's policy loss
        batch["importance_weights"] = (rng.uniform(0, 2, size=(rows, width)) * mask).astype(
            np.float32
        )
    cfg = PPOConfig(temperature=0.9, vf_coef=0.5)
    loss, metrics = ppo_loss(
        NumpyOps, LogitsForward(NumpyOps, logits, scores=scores, chunk=4), batch, cfg
    )
    assert float(loss) == pytest.approx(oracle_ppo(logits, scores, batch, cfg), rel=1e-5)
    assert 0 < float(metrics["clip_fraction"]) < 1


def test_one_update_matches_across_backends(one_update, tiny_dir):
    cfg = PPOConfig(temperature=1.0)
    rng = np.random.default_rng(0)
    rows, prompt, completion = 4, 5, 7
    ids = rng.integers(3, 300, size=(rows, prompt + completion)).astype(np.int32)
    mask = np.zeros(ids.shape, np.float32)
    mask[:, prompt:] = 1

    def make_batch(backend, model):
        current = backend.logprobs(model, ids, np.ones_like(ids))
        return {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "loss_mask": mask,
            "old_logprobs": ((current + rng.normal(0, 0.2, size=current.shape)) * mask).astype(
                np.float32
            ),
            "old_values": (rng.normal(size=ids.shape) * mask).astype(np.float32),
            "advantages": (rng.normal(size=ids.shape) * mask).astype(np.float32),
            "returns": (rng.normal(size=ids.shape) * mask).astype(np.float32),
        }

    keys = ("loss", "policy_loss", "value_loss", "approx_kl", "grad_norm")
    _, weights = one_update(
        tiny_dir / "tiny-gemma2", partial(ppo_loss, cfg=cfg), make_batch, keys, scalar_head=True
    )
    assert any(name.startswith("score.") for name in weights), "the value head did not train"
