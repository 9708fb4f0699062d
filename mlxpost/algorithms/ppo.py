"""PPO with a critic and GAE for language models (Ouyang et al., 2022; the cleanrl recipe).

The critic (--critic) is one of:
- separate (the default): its own LoRA adapter and value head (mlxpost/backend_shared/heads.py)
  on a second copy of the base model, with its own optimizer. Value gradients never touch
  the policy, so the critic can learn as fast as it needs to; it costs a second model in
  memory and a second forward and backward pass per minibatch.
- reward_model: the same, initialised from --reward-model's adapter and head, as
  InstructGPT initialised its value function from the reward model.
- shared: a value head on the policy's own trunk; one forward pass gives logits and values,
  and the loss is policy_loss + vf_coef * value_loss. Half the memory, but on the bundled
  model its explained variance stays below zero (docs/results.md).
--value-warmup-steps trains the critic alone for the first steps; with normalised values
(the default) it learns returns divided by their running std, after the running mean is
subtracted, and its outputs are denormalised for GAE.

Per completion token t the reward is -beta * KL_t (k1 or k3 of the policy against the
reference, the adapter switched off); beta is --kl-beta, or with --kl-target the adaptive
controller's value (Ziegler et al., 2019; mlxpost/algorithms/ppo_control.py). The
sequence's score is added at its last token: the weighted reward functions plus
--reward-model-weight times the reward model's score (normalised by the running mean and
std of its scores, optionally clipped), minus --missing-eos-penalty for a completion cut
at --max-new-tokens and --length-penalty per token. Advantages are GAE(gamma, lambda) over
detached values, whitened over the batch's tokens; the policy loss and (optionally) the
value loss are clipped; several epochs of shuffled minibatches run over each rollout
buffer, stopping early once the approximate KL passes 1.5 * target_kl.

Departures from InstructGPT: no pretraining-mix term (PPO-ptx); the reference is the base
model with the adapter off; LoRA on policy and critic rather than full fine-tuning.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from mlxpost import distributed
from mlxpost.algorithms.ppo_control import KLController, RunningMoments
from mlxpost.algorithms.rollouts import RLConfig, Rollouts
from mlxpost.backend import OptimConfig
from mlxpost.batching import split_indices
from mlxpost.config import option
from mlxpost.errors import UserError
from mlxpost.functional import head_terms, kl_estimate, masked_mean
from mlxpost.loop import Algorithm, Session
from mlxpost.ops import NumpyOps
from mlxpost.run import load_arrays, save_arrays

CRITICS = ("shared", "separate", "reward_model")


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
    clip_range_value: float = option(
        0.2, "Value clip range around the rollout's values (0: no value clipping).", ge=0
    )
    vf_coef: float = option(0.1, "Weight of the value loss.", ge=0)
    whiten_advantages: bool = option(
        True,
        "Normalise advantages over the batch's tokens.",
        flag="--whiten-advantages/--raw-advantages",
    )
    target_kl: float = option(
        0.1, "Stop the epochs early when the approximate KL exceeds 1.5x this (0: never).", ge=0
    )
    kl_target: float = option(
        0.0,
        "Adaptive KL controller (Ziegler et al., 2019): steer --kl-beta so the KL per sequence "
        "approaches this many nats; 0: --kl-beta stays fixed.",
        ge=0,
    )
    kl_horizon: float = option(
        500.0, "Adaptive KL horizon in rollouts: how fast the coefficient moves.", gt=0
    )
    critic: str = option(
        "separate",
        "The critic: shared (a value head on the policy's trunk and adapter), separate (its own "
        "LoRA and head on the base model, its own optimizer) or reward_model (a separate critic "
        "initialised from --reward-model, as InstructGPT did).",
        CRITICS,
    )
    critic_learning_rate: float | None = option(
        None, "Learning rate of a separate critic (default: --learning-rate).", gt=0
    )
    value_warmup_steps: int = option(
        0,
        "Steps at the start that train only the critic, the policy unchanged (with --critic "
        "shared the value loss still moves the shared adapter).",
        ge=0,
    )
    normalise_values: bool = option(
        True,
        "Train the critic on returns normalised by their running mean and std.",
        flag="--normalise-values/--raw-values",
    )
    reward_model: str | None = option(
        None, "Reward model directory from `mlxpost rm`; its score joins --rewards."
    )
    rewards: str | None = option(
        None,
        "Comma-separated reward functions (see grpo), or none. Default: math,format without "
        "--reward-model, none with one.",
    )
    reward_model_weight: float = option(1.0, "Weight of the reward model's score.")
    normalise_reward_model: bool = option(
        True,
        "Normalise reward-model scores by the running mean and std of all scores so far.",
        flag="--normalise-reward-model/--raw-reward-model",
    )
    reward_clip: float = option(
        0.0, "Clip the (normalised) reward-model score to +-this; 0: no clipping.", ge=0
    )
    missing_eos_penalty: float = option(
        0.0, "Subtracted from the score of a completion cut at --max-new-tokens.", ge=0
    )
    length_penalty: float = option(
        0.0, "Subtracted from the score per completion token (a length term).", ge=0
    )

    def optim_config(self) -> OptimConfig:
        """The schedule counts optimizer updates: --ppo-epochs x --minibatches of them a step,
        so warmup and decay span the run's steps (not its first steps / updates)."""
        base = super().optim_config()
        updates = self.ppo_epochs * self.minibatches
        return replace(
            base,
            warmup_steps=base.warmup_steps * updates,
            total_steps=base.total_steps * updates,
        )

    def __post_init__(self):
        if self.rewards is None:
            self.rewards = "none" if self.reward_model else "math,format"
        super().__post_init__()
        if self.rewards.strip() == "none" and not self.reward_model:
            raise UserError("--rewards none needs --reward-model: nothing would score")
        if self.critic == "reward_model" and not self.reward_model:
            raise UserError("--critic reward_model needs --reward-model")
        if self.fsdp:
            raise UserError(
                "--fsdp is not supported for ppo (its critic is another trained model); run it "
                "data-parallel without --fsdp"
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
    """Values centred and scaled by their mean and std where mask > 0, over every rank's
    tokens in a data-parallel run (mlxpost.distributed)."""
    mean, std, count = distributed.mean_and_std(values, mask)
    if count < 2:
        return values * mask
    return (values - mean) / (std + eps) * mask


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
    value_loss = clipped_value_loss(ops, values, batch, cfg)
    loss = policy_loss + cfg.vf_coef * value_loss
    metrics = {
        "policy_loss": policy_loss,
        "value_loss": value_loss,
        "clip_fraction": masked_mean(ops, ops.where(pg_loss2 > pg_loss1, 1.0, 0.0), loss_mask),
        "approx_kl": masked_mean(ops, (ratio - 1.0) - log_ratio, loss_mask),
        "entropy": masked_mean(ops, terms["entropy"], loss_mask),  # no gradient: a metric
    }
    return loss, metrics


def clipped_value_loss(ops, values, batch, cfg: PPOConfig):
    """0.5 * mean of max((v - R)^2, (v_clipped - R)^2) over loss_mask, v_clipped within
    clip_range_value of the rollout's values (0: unclipped, 0.5 * (v - R)^2)."""
    loss_mask, returns = batch["loss_mask"], batch["returns"]
    v_loss_unclipped = ops.square(values - returns)
    if not cfg.clip_range_value:
        return 0.5 * masked_mean(ops, v_loss_unclipped, loss_mask)
    old_values = batch["old_values"]
    v_clipped = old_values + ops.clip(
        values - old_values, -cfg.clip_range_value, cfg.clip_range_value
    )
    v_loss_clipped = ops.square(v_clipped - returns)
    return 0.5 * masked_mean(ops, ops.maximum(v_loss_unclipped, v_loss_clipped), loss_mask)


def critic_loss(ops, forward, batch, cfg: PPOConfig):
    """The value loss alone: a separate critic's loss, and the shared head's during warmup.

    batch: input_ids, attention_mask, loss_mask, old_values, returns, as ppo_loss's."""
    scores = forward.scores(batch["input_ids"], batch["attention_mask"])  # (B, T)
    values = ops.concatenate([ops.zeros((scores.shape[0], 1)), scores[:, :-1]], axis=1)
    value_loss = clipped_value_loss(ops, values, batch, cfg)
    return value_loss, {"value_loss": value_loss}


def sequence_kl(kl: np.ndarray) -> float:
    """Mean over sequences of the summed per-token KL: what the adaptive controller targets."""
    return float(kl.sum(axis=1).mean()) if kl.size else 0.0


def shaped_scores(
    model_scores: np.ndarray | None,
    rule_scores: np.ndarray,
    finished: np.ndarray,
    lengths: np.ndarray,
    cfg: PPOConfig,
    moments: RunningMoments | None,
) -> np.ndarray:
    """The sequence score added at each completion's last token.

    reward_model_weight * the reward model's score (normalised by the running mean and std
    of every score so far when `moments` is given, then clipped to +-reward_clip), plus the
    weighted reward functions, minus missing_eos_penalty for a completion cut at
    max_new_tokens, minus length_penalty per completion token."""
    total = np.asarray(rule_scores, np.float64).copy()
    if model_scores is not None:
        scores = np.asarray(model_scores, np.float64)
        if moments is not None:
            moments.update(scores)
            scores = moments.normalise(scores)
        if cfg.reward_clip:
            scores = np.clip(scores, -cfg.reward_clip, cfg.reward_clip)
        total += cfg.reward_model_weight * scores
    total -= cfg.missing_eos_penalty * (~np.asarray(finished, bool))
    total -= cfg.length_penalty * np.asarray(lengths, np.float64)
    return total


def rollout_buffer(
    rollout: dict[str, np.ndarray],
    scores: np.ndarray,
    kl: np.ndarray,
    kl_coef: float,
    critic_outputs: np.ndarray,
    cfg: PPOConfig,
    value_moments: RunningMoments | None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(buffer for the losses, raw values and returns) of one batch of rollouts.

    rollout: input_ids, attention_mask, loss_mask, old_logprobs (N, T). Per token the reward
    is -kl_coef * kl, and each sequence's score is added at its last counted token. The critic
    outputs (N, T) are the value of token t+1's state at t; with `value_moments` they are in
    normalised units: values = denormalise(outputs), and the critic is trained on
    normalise(returns) after the moments take in this batch's returns."""
    loss_mask = rollout["loss_mask"]
    rewards = -kl_coef * kl
    last = np.argmax(np.cumsum(loss_mask, axis=1), axis=1)  # each row's final counted token
    has_tokens = loss_mask.sum(axis=1) > 0
    rewards[np.arange(len(last))[has_tokens], last[has_tokens]] += scores[has_tokens]
    outputs = np.concatenate(
        [np.zeros((critic_outputs.shape[0], 1)), critic_outputs[:, :-1]], axis=1
    )  # (N, T): the value of token t's state
    values = (value_moments.denormalise(outputs) if value_moments else outputs) * loss_mask
    advantages = gae(rewards, values, loss_mask, cfg.gamma, cfg.lam)
    returns = advantages + values
    if cfg.whiten_advantages:
        advantages = whiten(advantages, loss_mask)
    targets, old_values = returns, values
    if value_moments is not None:
        value_moments.update(returns[loss_mask > 0])
        targets = value_moments.normalise(returns) * loss_mask
        old_values = outputs * loss_mask
    buffer = {
        **rollout,
        "old_values": old_values.astype(np.float32),
        "advantages": advantages.astype(np.float32),
        "returns": targets.astype(np.float32),
    }
    return buffer, {"values": values, "returns": returns}


# ---- the loop ----


class PPO(Algorithm):
    def __init__(self, session: Session, cfg: PPOConfig):
        self.session, self.cfg = session, cfg
        self.rollouts = Rollouts(session, cfg, "ppo")
        self.loss_fn = partial(ppo_loss, cfg=cfg)
        session.backend  # noqa: B018  (joins the launcher's ranks, if any, to count them)
        ranks = distributed.world().size
        if cfg.batch_size // ranks * cfg.num_generations < cfg.minibatches:
            # every rank takes part in each minibatch's update
            raise UserError(
                f"--minibatches {cfg.minibatches}: each of the {ranks} ranks has only "
                f"{cfg.batch_size // ranks * cfg.num_generations} rollouts a step; raise "
                "--batch-size or lower --minibatches"
            )
        # With a separate critic the policy's own head gets no value gradient.
        self.policy_loss_fn = partial(ppo_loss, cfg=replace(cfg, vf_coef=0.0))
        self.critic_loss_fn = partial(critic_loss, cfg=cfg)
        self.kl = KLController(cfg.kl_beta, cfg.kl_target, cfg.kl_horizon)
        self.score_moments = RunningMoments() if cfg.normalise_reward_model else None
        self.value_moments = RunningMoments() if cfg.normalise_values else None
        self.reward_model = None
        if cfg.reward_model:
            from mlxpost.reward_model import load_reward_model

            self.reward_model = load_reward_model(session.backend, cfg.reward_model)
            session.say(f"scores from the reward model {cfg.reward_model}")
        self.critic = self.critic_optimizer = None
        if cfg.critic != "shared":
            self.critic, self.critic_optimizer = make_critic(session.backend, cfg)
            session.say(f"critic: {cfg.critic}")
        self.restored = not cfg.resume

    def scores(self, rollout) -> tuple[np.ndarray, dict]:
        rules, metrics = self.rollouts.score(rollout)
        model_scores = None
        if self.reward_model is not None:
            from mlxpost.reward_model import score_texts

            model, info = self.reward_model
            prompts = [self.rollouts.examples[i].prompt_messages for i in rollout.source]
            model_scores = score_texts(self.session.backend, model, info, prompts, rollout.texts)
            metrics["reward/reward_model"] = float(model_scores.mean())
        samples = rollout.samples
        total = shaped_scores(
            model_scores,
            rules,
            samples.finished,
            samples.completion_mask.sum(axis=1),
            self.cfg,
            self.score_moments,
        )
        return total, metrics

    def critic_outputs(self, rollout) -> np.ndarray:
        model = self.critic if self.critic is not None else self.session.model
        return self.session.backend.scores(model, rollout.input_ids, rollout.attention_mask)

    def optimise(self, buffer: dict, step: int) -> tuple[list[dict], list[dict], bool]:
        """PPO epochs over shuffled minibatches: (policy metrics, critic metrics, stopped
        early). During value warmup only the critic trains."""
        session, cfg, backend = self.session, self.cfg, self.session.backend
        warmup = step < cfg.value_warmup_steps
        policy, critic, stopped = [], [], False
        rows = buffer["input_ids"].shape[0]
        for epoch in range(cfg.ppo_epochs):
            order = np.random.default_rng([cfg.seed, step, epoch]).permutation(rows)
            for part in split_indices(order, cfg.minibatches):
                minibatch = {k: v[part] for k, v in buffer.items()}
                # token means: over several ranks each weighs by its share of the tokens
                tokens = [float(minibatch["loss_mask"].sum())]
                if self.critic is not None:
                    critic.append(
                        backend.train_step(
                            self.critic,
                            self.critic_optimizer,
                            self.critic_loss_fn,
                            [minibatch],
                            tokens,
                        )
                    )
                elif warmup:
                    critic.append(
                        backend.train_step(
                            session.model,
                            session.optimizer,
                            self.critic_loss_fn,
                            [minibatch],
                            tokens,
                        )
                    )
                if warmup:
                    continue
                loss_fn = self.loss_fn if self.critic is None else self.policy_loss_fn
                policy.append(
                    backend.train_step(
                        session.model, session.optimizer, loss_fn, [minibatch], tokens
                    )
                )
                if cfg.target_kl and policy[-1]["approx_kl"] > 1.5 * cfg.target_kl:
                    stopped = True
                    break
            if stopped:
                break
        return policy, critic, stopped

    def train_step(self, step: int) -> dict[str, float]:
        session, cfg = self.session, self.cfg
        backend = session.backend
        if not self.restored:
            self.restore()
        backend.seed(distributed.rank_seed(cfg.seed + step))  # a rank's own draws
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
        kl_coef = self.kl.value
        buffer, raw = rollout_buffer(
            {
                "input_ids": rollout.input_ids,
                "attention_mask": rollout.attention_mask,
                "loss_mask": loss_mask,
                "old_logprobs": rollout.old_logprobs,
                **rollout.correction,
            },
            scores,
            kl,
            kl_coef,
            self.critic_outputs(rollout),
            cfg,
            self.value_moments,
        )
        policy, critic, stopped = self.optimise(buffer, step)
        # every rank's sequences, so the coefficient stays the same on all of them
        kl_total, sequences = distributed.world().all_sum([kl.sum(), kl.shape[0]])
        self.kl.update(kl_total / max(sequences, 1.0), int(sequences))
        history = policy or critic
        metrics = {**history[-1]}
        if critic:
            metrics["value_loss"] = critic[-1]["value_loss"]
            metrics["critic_grad_norm"] = critic[-1]["grad_norm"]
        return {
            **metrics,
            "nonfinite_updates": sum(h["nonfinite_updates"] for h in policy + critic),
            "policy_updates": float(len(policy)),
            "early_stopped": float(stopped),
            "score": float(scores.mean()),
            **score_metrics,
            "reward_kl": float(kl.sum() / max(loss_mask.sum(), 1.0)),
            "sequence_kl": sequence_kl(kl),
            "kl_coef": kl_coef,
            "explained_variance": explained_variance(raw["values"], raw["returns"], loss_mask),
            **self.rollouts.summary(rollout),
        }

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out math accuracy; with a reward model also its mean raw score of the same
        greedy completions (eval_reward_model_score): what the policy is trained to raise."""
        math = self.rollouts.math
        if self.reward_model is None or not math:
            return self.rollouts.evaluate()
        from mlxpost.reward_model import score_texts

        session = self.session
        report = math.score(session.backend, session.model, session.info, keep_texts=True)
        model, info = self.reward_model
        prompts = [ex.prompt_messages for ex in math.examples]
        scores = score_texts(session.backend, model, info, prompts, report["completions"])
        return {
            "math_accuracy": report["accuracy"],
            "eval_completion_length": report["mean_completion_tokens"],
            "eval_reward_model_score": float(scores.mean()),
        }

    def export(self, directory: str) -> None:
        """ppo_state.json (KL coefficient, running moments) and a separate critic's weights
        and optimizer state, so --resume continues where the run stopped."""
        state = {"kl": self.kl.state()}
        for name in ("score_moments", "value_moments"):
            if getattr(self, name) is not None:
                state[name] = getattr(self, name).state()
        if self.critic is not None:
            backend = self.session.backend
            optimizer = backend.optimizer_state(self.critic_optimizer)
            state["critic_optimizer_step"] = int(optimizer["step"])
            save_arrays(
                os.path.join(directory, CRITIC_FILE),
                backend.parameters(self.critic, trainable_only=True),
            )
            save_arrays(
                os.path.join(directory, CRITIC_OPTIMIZER_FILE),
                {k: v for k, v in optimizer.items() if k != "step"},
            )
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)

    def restore(self) -> None:
        """The state export() saved in the newest checkpoint (none yet: a fresh start)."""
        self.restored = True
        found = self.session.run.latest_checkpoint()
        if found is None:
            return
        path = found[1]
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
        self.kl.load_state(state["kl"])
        for name in ("score_moments", "value_moments"):
            if getattr(self, name) is not None and name in state:
                getattr(self, name).load_state(state[name])
        if self.critic is not None:
            backend = self.session.backend
            backend.set_parameters(self.critic, load_arrays(os.path.join(path, CRITIC_FILE)))
            backend.load_optimizer_state(
                self.critic_optimizer,
                {
                    "step": state["critic_optimizer_step"],
                    **load_arrays(os.path.join(path, CRITIC_OPTIMIZER_FILE)),
                },
            )


STATE_FILE = "ppo_state.json"
CRITIC_FILE = "critic.npz"
CRITIC_OPTIMIZER_FILE = "critic_optimizer.npz"


def make_critic(backend, cfg: PPOConfig):
    """(model, optimizer) of a separate critic: a scalar head and its own LoRA adapter on the
    base model (every weight with --full), or the reward model's weights to start from."""
    if cfg.critic == "reward_model":
        from mlxpost.reward_model import load_reward_model

        model, _ = load_reward_model(backend, cfg.reward_model, cfg.dtype)
    else:
        model = backend.load_model(cfg.model, cfg.dtype, quantize=cfg.quantize)
        backend.attach_scalar_head(model, seed=cfg.seed + 1)
        if cfg.lora:
            backend.attach_lora(model, cfg.lora_config(), seed=cfg.seed + 1)
    if cfg.grad_checkpoint:
        backend.set_grad_checkpoint(model, True)
    optim = replace(cfg.optim_config(), learning_rate=cfg.critic_learning_rate or cfg.learning_rate)
    return model, backend.make_optimizer(model, optim)
