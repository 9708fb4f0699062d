"""PPO's math: GAE against a plain loop, the loss against a numpy oracle, one update across backends."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from mlxpost.algorithms.ppo import (
    PPOConfig,
    critic_loss,
    explained_variance,
    gae,
    ppo_loss,
    rollout_buffer,
    sequence_kl,
    whiten,
)
from mlxpost.algorithms.ppo_control import KLController, RunningMoments
from mlxpost.functional import LogitsForward, kl_estimate
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


def oracle_critic_loss(scores, batch, clip):
    mask = batch["loss_mask"]
    total = 0.0
    for b, t in zip(*np.nonzero(mask)):
        value, old, ret = scores[b, t - 1], batch["old_values"][b, t], batch["returns"][b, t]
        clipped = old + min(max(value - old, -clip), clip) if clip else value
        total += 0.5 * max((value - ret) ** 2, (clipped - ret) ** 2)
    return total / mask.sum()


class FixedScores:
    def __init__(self, scores):
        self._scores = scores

    def scores(self, input_ids, attention_mask):
        return self._scores


@pytest.mark.parametrize("clip", [0.2, 0.0])
def test_critic_loss_matches_the_oracle_on_every_backend(clip, array_backends):
    rng = np.random.default_rng(2)
    rows, width = 3, 8
    scores = rng.normal(size=(rows, width)).astype(np.float32)
    mask = np.zeros((rows, width), np.float32)
    mask[:, 3:] = 1
    mask[1, 5:] = 0
    batch = {
        "input_ids": np.zeros((rows, width), np.int32),
        "attention_mask": np.ones((rows, width), np.int32),
        "loss_mask": mask,
        "old_values": (rng.normal(size=(rows, width)) * mask).astype(np.float32),
        "returns": (rng.normal(size=(rows, width)) * mask).astype(np.float32),
    }
    cfg = PPOConfig(clip_range_value=clip)
    expected = oracle_critic_loss(scores, batch, clip)
    for name, ops, convert in array_backends:
        loss, _ = critic_loss(
            ops, FixedScores(convert(scores)), {k: convert(v) for k, v in batch.items()}, cfg
        )
        assert float(ops.to_numpy(loss)) == pytest.approx(expected, rel=1e-5), name


def test_critic_update_matches_across_backends(one_update, tiny_dir):
    cfg = PPOConfig(clip_range_value=0.2)
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 300, size=(4, 12)).astype(np.int32)
    mask = np.zeros(ids.shape, np.float32)
    mask[:, 5:] = 1

    def make_batch(backend, model):
        return {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "loss_mask": mask,
            "old_values": (rng.normal(size=ids.shape) * mask).astype(np.float32),
            "returns": (rng.normal(size=ids.shape) * mask).astype(np.float32),
        }

    _, weights = one_update(
        tiny_dir / "tiny-gpt2",
        partial(critic_loss, cfg=cfg),
        make_batch,
        ("loss", "value_loss", "grad_norm"),
        scalar_head=True,
    )
    assert any(name.startswith("score.") for name in weights), "the value head did not train"


def test_separate_critic_and_adaptive_kl_step_matches_across_backends(backends, tiny_dir):
    """One PPO step as PPO.train_step takes it, minus sampling (fixed tokens): reference
    logprobs with the adapter off, per-token KL, the adaptive coefficient after one update,
    a separate critic's values (normalised), GAE, then one critic and one policy update.
    Both backends must give the same coefficient, advantages and updated weights."""
    from mlxpost.backend import LoraConfig, OptimConfig, adapter_disabled
    from mlxpost.parity import parity_lora_init

    cfg = PPOConfig(kl_beta=0.1, kl_target=0.5, kl_horizon=20.0, kl_estimator="k1")
    rng = np.random.default_rng(4)
    rows, prompt, completion = 4, 5, 7
    ids = rng.integers(3, 300, size=(rows, prompt + completion)).astype(np.int32)
    attention = np.ones_like(ids)
    loss_mask = np.zeros(ids.shape, np.float32)
    loss_mask[:, prompt:] = 1
    loss_mask[1, prompt + 4 :] = 0  # a completion that ended early
    noise = rng.normal(0, 0.3, size=ids.shape)
    scores = np.array([1.0, 0.0, 2.5, -1.0])
    optim = OptimConfig(learning_rate=1e-3, eps=1e-6, warmup_steps=0, total_steps=1)

    def make(backend, seed):
        model = backend.load_model(str(tiny_dir / "tiny-gpt2"))
        backend.attach_scalar_head(model, seed=seed)
        backend.attach_lora(model, LoraConfig(rank=4, alpha=8.0))
        backend.set_parameters(model, parity_lora_init(backend.parameters(model, True), seed))
        return model, backend.make_optimizer(model, optim)

    results = []
    for backend in backends:
        (policy, policy_optimizer), (critic, critic_optimizer) = make(backend, 0), make(backend, 1)
        old_logprobs = ((backend.logprobs(policy, ids, attention) + noise) * loss_mask).astype(
            np.float32
        )
        with adapter_disabled(backend, policy):
            reference = backend.logprobs(policy, ids, attention) * loss_mask
        kl = kl_estimate(NumpyOps, old_logprobs, reference, cfg.kl_estimator) * loss_mask
        controller = KLController(cfg.kl_beta, cfg.kl_target, cfg.kl_horizon)
        controller.update(sequence_kl(kl), rows)
        rollout = {
            "input_ids": ids,
            "attention_mask": attention,
            "loss_mask": loss_mask,
            "old_logprobs": old_logprobs,
        }
        buffer, _ = rollout_buffer(
            rollout,
            scores,
            kl,
            controller.value,
            backend.scores(critic, ids, attention),
            cfg,
            RunningMoments(),
        )
        critic_metrics = backend.train_step(
            critic, critic_optimizer, partial(critic_loss, cfg=cfg), [buffer]
        )
        policy_metrics = backend.train_step(
            policy,
            policy_optimizer,
            partial(ppo_loss, cfg=PPOConfig(vf_coef=0.0)),
            [buffer],
        )
        results.append(
            {
                "kl_coef": controller.value,
                "buffer": buffer,
                "metrics": {
                    **critic_metrics,
                    **{f"policy_{k}": v for k, v in policy_metrics.items()},
                },
                "critic": backend.parameters(critic, trainable_only=True),
                "policy": backend.parameters(policy, trainable_only=True),
            }
        )
    torch_run, mlx_run = results
    assert torch_run["kl_coef"] != cfg.kl_beta, "the controller did not move the coefficient"
    assert torch_run["kl_coef"] == pytest.approx(mlx_run["kl_coef"], rel=1e-5)
    for key in ("advantages", "returns", "old_values"):
        np.testing.assert_allclose(
            torch_run["buffer"][key], mlx_run["buffer"][key], rtol=1e-4, atol=2e-5, err_msg=key
        )
    for key in ("value_loss", "grad_norm", "policy_loss", "policy_grad_norm"):
        assert torch_run["metrics"][key] == pytest.approx(
            mlx_run["metrics"][key], rel=1e-5, abs=1e-7
        ), key
    for part in ("critic", "policy"):
        for name, value in torch_run[part].items():
            diff = np.abs(value - mlx_run[part][name]).max()
            assert diff <= 1e-5 * max(1.0, float(np.abs(value).max())), f"{part} {name}: {diff:.3g}"
