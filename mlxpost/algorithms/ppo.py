"""PPO with a critic and GAE for language models (Ouyang et al., 2022; the cleanrl recipe).

The critic is a value head (mlxpost/backend_shared/heads.py) on the policy's own trunk: one
forward pass gives the logits and the values, the LoRA adapter serves both,
and the loss is policy_loss + vf_coef * value_loss. This halves the memory
and compute of a separate critic model; the cost is that value gradients
also move the shared adapter, which vf_coef keeps small.

Per completion token t the reward is -kl_beta * KL_t (k1 or k3 of the policy
against the reference, the adapter switched off), and the sequence's score
(reward functions, or a reward model from `mlxpost rm`) is added at its last
token. Advantages are GAE(gamma, lambda) over detached values, whitened over
the batch's tokens; the policy and value losses are both clipped; several
epochs of shuffled minibatches run over each rollout buffer, stopping early
once the approximate KL passes 1.5 * target_kl.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from mlxpost.algorithms.rollouts import RLConfig, Rollouts
from mlxpost.batching import split_indices
from mlxpost.config import option
from mlxpost.functional import head_terms, kl_estimate, masked_mean
from mlxpost.loop import Algorithm, Session
from mlxpost.ops import NumpyOps


@dataclass
class PPOConfig(RLConfig):
    batch_size: int = option(16, "Prompts per step.")
    num_generations: int = option(2, "Completions per prompt.")
    ppo_epochs: int = option(4, "Epochs over each rollout buffer.")
    minibatches: int = option(2, "Minibatches per epoch (an optimizer step each).", ge=1)
    kl_beta: float = option(0.05, "Per-token KL penalty in the reward.")
    kl_estimator: str = option(
        "k1", "Per-token KL in the reward: k1 (log ratio) or k3.", ("k1", "k3")
    )
    gamma: float = option(1.0, "Discount.", ge=0, le=1)
    lam: float = option(0.95, "GAE lambda.", ge=0, le=1)
    clip_range: float = option(0.2, "Policy ratio clip range.", gt=0)
    clip_range_value: float = option(0.2, "Value clip range around the rollout's values.", gt=0)
    vf_coef: float = option(0.1, "Weight of the value loss.", ge=0)
    whiten_advantages: bool = option(
        True,
        "Normalise advantages over the batch's tokens.",
        flag="--whiten-advantages/--raw-advantages",
    )
    target_kl: float = option(
        0.1, "Stop the epochs early when the approximate KL exceeds 1.5x this (0: never).", ge=0
    )
    reward_model: str | None = option(
        None, "Reward model directory from `mlxpost rm`; replaces --rewards."
    )


# ---- the math ----


def gae(
    rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float
) -> np.ndarray:
    """Generalised advantage estimates over (N, C) per-token arrays; mask marks a row's
    tokens (a contiguous prefix). The value after a row's last token is 0 (terminal)."""
    advantages = np.zeros_like(values, dtype=np.float64)
    running = np.zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < values.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages


def whiten(values: np.ndarray, mask: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    picked = values[mask > 0]
    if picked.size < 2:
        return values * mask
    return (values - picked.mean()) / (picked.std() + eps) * mask


def explained_variance(values: np.ndarray, returns: np.ndarray, mask: np.ndarray) -> float:
    v, r = values[mask > 0], returns[mask > 0]
    variance = r.var()
    return float(1.0 - (r - v).var() / variance) if variance > 0 else float("nan")


def ppo_loss(ops, forward, batch, cfg: PPOConfig):
    """Clipped policy loss + vf_coef * clipped value loss, token means over loss_mask.

    batch: input_ids, attention_mask, loss_mask, old_logprobs, old_values, advantages,
    returns (all (B, T) aligned with input_ids; the value of token t is the critic's
    output at t - 1, the state it was chosen in); optionally importance_weights (B, T), the
    detached sampler/trainer correction of algorithms/importance.py on the policy loss.
    """
    ids, mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    hidden, scores = forward.hidden_and_scores(ids, mask)
    terms = head_terms(
        ops, forward, ids, mask, hidden=hidden, temperature=cfg.temperature, entropy=True
    )
    logprobs = terms["logprobs"]
    values = ops.concatenate([ops.zeros((scores.shape[0], 1)), scores[:, :-1]], axis=1)
    log_ratio = (logprobs - batch["old_logprobs"]) * loss_mask
    ratio = ops.exp(log_ratio)
    advantages = batch["advantages"]
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * ops.clip(ratio, 1.0 - cfg.clip_range, 1.0 + cfg.clip_range)
    policy_per_token = ops.maximum(pg_loss1, pg_loss2)
    if "importance_weights" in batch:  # sampler/trainer mismatch correction (importance.py)
        policy_per_token = policy_per_token * batch["importance_weights"]
    policy_loss = masked_mean(ops, policy_per_token, loss_mask)
    old_values = batch["old_values"]
    v_clipped = old_values + ops.clip(
        values - old_values, -cfg.clip_range_value, cfg.clip_range_value
    )
    v_loss_unclipped = ops.square(values - batch["returns"])
    v_loss_clipped = ops.square(v_clipped - batch["returns"])
    value_loss = 0.5 * masked_mean(ops, ops.maximum(v_loss_unclipped, v_loss_clipped), loss_mask)
    loss = policy_loss + cfg.vf_coef * value_loss
    metrics = {
        "policy_loss": policy_loss,
        "value_loss": value_loss,
        "clip_fraction": masked_mean(ops, ops.where(pg_loss2 > pg_loss1, 1.0, 0.0), loss_mask),
        "approx_kl": masked_mean(ops, (ratio - 1.0) - log_ratio, loss_mask),
        "entropy": masked_mean(ops, terms["entropy"], loss_mask),  # no gradient: a metric
    }
    return loss, metrics


# ---- the loop ----


class PPO(Algorithm):
    def __init__(self, session: Session, cfg: PPOConfig):
        self.session, self.cfg = session, cfg
        self.rollouts = Rollouts(session, cfg, "ppo")
        self.loss_fn = partial(ppo_loss, cfg=cfg)
        self.reward_model = None
        if cfg.reward_model:
            from mlxpost.reward_model import load_reward_model

            self.reward_model = load_reward_model(session.backend, cfg.reward_model)
            session.say(f"scores from the reward model {cfg.reward_model}")

    def scores(self, rollout) -> tuple[np.ndarray, dict]:
        if self.reward_model is None:
            return self.rollouts.score(rollout)
        from mlxpost.reward_model import score_texts

        model, info = self.reward_model
        prompts = [self.rollouts.examples[i].prompt_messages for i in rollout.source]
        values = score_texts(self.session.backend, model, info, prompts, rollout.texts)
        return values, {"reward/reward_model": float(values.mean())}

    def train_step(self, step: int) -> dict[str, float]:
        session, cfg = self.session, self.cfg
        backend, model = session.backend, session.model
        backend.seed(cfg.seed + step)
        rollout = self.rollouts.sample(step)
        scores, score_metrics = self.scores(rollout)
        loss_mask = rollout.loss_mask
        kl = (
            kl_estimate(
                NumpyOps,
                rollout.old_logprobs,
                self.rollouts.reference_logprobs(rollout),
                cfg.kl_estimator,
            )
            * loss_mask
        )
        rewards = -cfg.kl_beta * kl
        last = np.argmax(np.cumsum(loss_mask, axis=1), axis=1)  # each row's final counted token
        has_tokens = loss_mask.sum(axis=1) > 0
        rewards[np.arange(len(last))[has_tokens], last[has_tokens]] += scores[has_tokens]
        critic = backend.scores(model, rollout.input_ids, rollout.attention_mask)  # (N, T)
        values = (
            np.concatenate([np.zeros((critic.shape[0], 1)), critic[:, :-1]], axis=1) * loss_mask
        )
        advantages = gae(rewards, values, loss_mask, cfg.gamma, cfg.lam)
        returns = advantages + values
        if cfg.whiten_advantages:
            advantages = whiten(advantages, loss_mask)
        buffer = {
            "input_ids": rollout.input_ids,
            "attention_mask": rollout.attention_mask,
            "loss_mask": loss_mask,
            "old_logprobs": rollout.old_logprobs,
            "old_values": values.astype(np.float32),
            "advantages": advantages.astype(np.float32),
            "returns": returns.astype(np.float32),
            **rollout.correction,
        }
        history, stopped = [], False
        rows = rollout.input_ids.shape[0]
        for epoch in range(cfg.ppo_epochs):
            order = np.random.default_rng([cfg.seed, step, epoch]).permutation(rows)
            for part in split_indices(order, cfg.minibatches):
                minibatch = {k: v[part] for k, v in buffer.items()}
                history.append(
                    backend.train_step(model, session.optimizer, self.loss_fn, [minibatch])
                )
                if cfg.target_kl and history[-1]["approx_kl"] > 1.5 * cfg.target_kl:
                    stopped = True
                    break
            if stopped:
                break
        return {
            **history[-1],
            "nonfinite_updates": sum(h["nonfinite_updates"] for h in history),
            "epochs_run": epoch + 1,
            "early_stopped": float(stopped),
            "score": float(scores.mean()),
            **score_metrics,
            "reward_kl": float(kl.sum() / max(loss_mask.sum(), 1.0)),
            "explained_variance": explained_variance(values, returns, loss_mask),
            **self.rollouts.summary(rollout),
        }

    def evaluate(self, step: int) -> dict[str, float]:
        return self.rollouts.evaluate()
