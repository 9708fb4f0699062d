"""GRPO (Shao et al., 2024, DeepSeekMath) and its variants.

Each step samples `num_generations` completions per prompt (one shared prompt
prefill), scores them with the reward functions, turns rewards into
group-relative advantages in numpy, and takes `ppo_epochs` clipped policy
gradient passes over the rollouts with the old (behaviour) logprobs kept.

Variants, by option:
- advantages: group mean-centred, scaled by the group std (GRPO), the batch std,
  or not at all (Dr. GRPO, Liu et al., 2025); or rank-based within the group.
- clipping: separate lower/upper ranges (DAPO's clip-higher, Yu et al., 2025).
- importance ratio: per token (GRPO) or per sequence as the geometric mean of
  token ratios (GSPO, Zheng et al., 2025).
- aggregation: `grpo` mean over each sequence's tokens then over sequences;
  `bnpo` mean over the tokens of each microbatch; `dapo` mean over all tokens
  of the step's batch; `dr_grpo` sum over tokens / (sequences * max new tokens).
- KL to the reference (the adapter switched off) with the k1/k2/k3 estimators.
- optional masking of completions truncated at max_new_tokens.

Departures from the paper: the old logprobs are the sampler's behaviour
logprobs (the trainer's own are not recomputed; their mean gap is logged as
`logprob_gap`), and the KL term is off by default (beta = 0), as in DAPO and
Dr. GRPO.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from mlxpost import assets
from mlxpost.backend import SamplingConfig, adapter_disabled
from mlxpost.config import TrainConfig, option
from mlxpost.data import load_examples
from mlxpost.errors import UserError
from mlxpost.evaluation import MathEvalConfig, evaluate_math, math_examples
from mlxpost.functional import kl_estimate, masked_mean, masked_sum, token_entropy, token_logprobs
from mlxpost.generation import encode_prompt
from mlxpost.loop import Session
from mlxpost.rewards import RewardSet

ADVANTAGES = ("group", "batch", "none", "rank")
AGGREGATIONS = ("grpo", "bnpo", "dapo", "dr_grpo")


@dataclass
class GRPOConfig(TrainConfig):
    batch_size: int = option(8, "Prompts per step (each gets --num-generations completions).")
    learning_rate: float = option(5e-4, "Peak learning rate (AdamW).")
    steps: int = option(100, "Steps (one batch of rollouts each).")
    num_generations: int = option(8, "Completions per prompt (the group).")
    max_new_tokens: int = option(128, "Tokens generated per completion at most.")
    temperature: float = option(1.0, "Sampling temperature (also used for the trainer's logprobs).")
    top_p: float = option(1.0, "Nucleus sampling mass.")
    top_k: int = option(0, "Top-k sampling (0: off).")
    rewards: str = option(
        "math,format",
        "Comma-separated reward functions: built-ins (math, format, repetition, answered) or module:function.",
    )
    reward_weights: str | None = option(
        None, "Comma-separated weights, one per reward (default: all 1)."
    )
    advantage: str = option(
        "group",
        "Advantage scale: group std (GRPO), batch std, none (Dr. GRPO), or rank within the group.",
        ADVANTAGES,
    )
    clip_low: float = option(0.2, "Lower clip range: ratios below 1 - clip_low are clipped.")
    clip_high: float = option(
        0.2, "Upper clip range: ratios above 1 + clip_high are clipped (DAPO: 0.28)."
    )
    importance: str = option(
        "token", "Importance ratio per token (GRPO) or per sequence (GSPO).", ("token", "sequence")
    )
    aggregation: str = option("grpo", "How token losses are averaged.", AGGREGATIONS)
    kl_beta: float = option(0.0, "Weight of the KL penalty to the reference (adapter off); 0: off.")
    kl_estimator: str = option("k3", "KL estimator (Schulman's k1, k2, k3).", ("k1", "k2", "k3"))
    ppo_epochs: int = option(1, "Optimisation passes over each batch of rollouts.")
    mask_truncated: bool = option(
        False, "Leave completions cut at --max-new-tokens out of the loss."
    )
    eval_every: int = option(10, "Evaluate every N steps (0: only at the end).")
    save_every: int = option(50, "Checkpoint every N steps (0: only the final one).")
    eval_math: int = option(
        200, "Held-out math problems scored greedily at each evaluation (0: off)."
    )
    eval_math_data: str | None = option(
        None, "Math problems for --eval-math; default: the bundled math test split."
    )

    def __post_init__(self):
        super().__post_init__()
        if self.num_generations < 2 and self.advantage != "none":
            raise UserError("--num-generations must be at least 2 for group advantages")
        if self.clip_low < 0 or self.clip_high < 0 or self.clip_low >= 1:
            raise UserError(
                f"need 0 <= --clip-low < 1 and --clip-high >= 0, got {self.clip_low}, {self.clip_high}"
            )


# ---- the math ----


def group_advantages(
    rewards: np.ndarray, group_size: int, scale: str, eps: float = 1e-4
) -> np.ndarray:
    """Group-relative advantages of (N,) rewards ordered prompt-major in groups of group_size."""
    groups = rewards.reshape(-1, group_size)  # (P, G)
    if scale == "rank":
        # Ranks (ties averaged) centred and scaled to [-1, 1]: robust to the rewards' scale.
        ranks = np.argsort(np.argsort(groups, axis=1, kind="stable"), axis=1).astype(np.float64)
        for row in range(groups.shape[0]):
            for value in np.unique(groups[row]):
                tied = groups[row] == value
                ranks[row, tied] = ranks[row, tied].mean()
        return ((ranks - (group_size - 1) / 2) / max((group_size - 1) / 2, 1)).reshape(-1)
    centred = groups - groups.mean(axis=1, keepdims=True)
    if scale == "group":
        centred = centred / (groups.std(axis=1, keepdims=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps)
    return centred.reshape(-1)


def grpo_loss(ops, forward, batch, cfg: GRPOConfig):
    """Clipped surrogate (+ beta * KL) over completion tokens, aggregated per cfg.aggregation.

    batch: input_ids, attention_mask (prompt + completion), loss_mask (completion tokens),
    old_logprobs, ref_logprobs (aligned, 0 outside completions), advantages (B,),
    normaliser (scalar tokens for bnpo/dapo/dr_grpo).
    """
    ids, mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    logits = forward.logits(ids, mask)
    logprobs = token_logprobs(ops, logits, ids, cfg.temperature)  # (B, T)
    log_ratio = (logprobs - batch["old_logprobs"]) * loss_mask
    if cfg.importance == "sequence":
        # GSPO: one ratio per sequence, the geometric mean of its token ratios.
        seq_log_ratio = masked_mean(ops, log_ratio, loss_mask, axis=1)  # (B,)
        log_ratio = seq_log_ratio[:, None] * loss_mask
    ratio = ops.exp(log_ratio)
    advantages = batch["advantages"][:, None]  # (B, 1)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * ops.clip(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    per_token = ops.maximum(pg_loss1, pg_loss2)
    kl = kl_estimate(ops, logprobs, batch["ref_logprobs"], cfg.kl_estimator) * loss_mask
    if cfg.kl_beta > 0:
        per_token = per_token + cfg.kl_beta * kl
    if cfg.aggregation == "grpo":
        loss = ops.mean(masked_mean(ops, per_token, loss_mask, axis=1))
    else:
        loss = masked_sum(ops, per_token, loss_mask) / batch["normaliser"]
    clipped = ops.where(pg_loss2 > pg_loss1, 1.0, 0.0)  # the clipped branch is the active one
    metrics = {
        "policy_loss": loss,
        "clip_fraction": masked_mean(ops, clipped, loss_mask),
        "kl": masked_mean(ops, kl, loss_mask),
        "entropy": masked_mean(ops, token_entropy(ops, logits, cfg.temperature), loss_mask),
        "logprob_gap": masked_mean(ops, ops.abs(logprobs - batch["old_logprobs"]), loss_mask),
    }
    return loss, metrics


# ---- the loop ----


class GRPO:
    def __init__(self, session: Session, cfg: GRPOConfig):
        self.session, self.cfg = session, cfg
        data = cfg.data or assets.default_data("grpo")
        _, self.examples = load_examples(data, "grpo")
        tokenizer = session.info.tokenizer
        self.prompts = [encode_prompt(tokenizer, ex.prompt_messages) for ex in self.examples]
        self.prompt_texts = [tokenizer.decode(p) for p in self.prompts]
        self.rewards = RewardSet.parse(cfg.rewards, cfg.reward_weights)
        self.math = (
            math_examples(cfg.eval_math_data or assets.default_data("eval-math"), cfg.eval_math)
            if cfg.eval_math
            else []
        )
        self.loss_fn = partial(grpo_loss, cfg=cfg)
        session.say(
            f"{data}: {len(self.examples)} prompts; rewards {', '.join(self.rewards.names)}"
        )

    def prompt_indices(self, step: int) -> np.ndarray:
        count, size = len(self.examples), self.cfg.batch_size
        positions = np.arange(step * size, (step + 1) * size)
        epochs, offsets = np.divmod(positions, count)
        orders = {
            int(e): np.random.default_rng([self.cfg.seed, int(e)]).permutation(count)
            for e in np.unique(epochs)
        }
        return np.array([orders[int(e)][o] for e, o in zip(epochs, offsets)])

    def rollouts(self, step: int):
        session, cfg = self.session, self.cfg
        backend, model, info = session.backend, session.model, session.info
        chosen = self.prompt_indices(step)
        sampling = SamplingConfig(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            n=cfg.num_generations,
        )
        samples = backend.sample(
            model,
            [self.prompts[i] for i in chosen],
            sampling,
            info.eos_ids,
            info.pad_id,
            seed=cfg.seed * 1_000_003 + step,
        )
        texts = [
            info.tokenizer.decode(row[m == 1], skip_special_tokens=True)
            for row, m in zip(samples.completion_ids, samples.completion_mask)
        ]
        source = chosen[samples.prompt_index]
        columns = {
            key: [self.examples[i].extras.get(key) for i in source]
            for key in self.examples[0].extras
        }
        rewards, reward_metrics = self.rewards.score(
            [self.prompt_texts[i] for i in source], texts, columns, session.say
        )
        return samples, rewards, reward_metrics

    def build_batch(self, samples, rewards):
        cfg = self.cfg
        width = samples.prompt_ids.shape[1]
        ids = np.concatenate([samples.prompt_ids, samples.completion_ids], axis=1)
        attention = np.concatenate([samples.prompt_mask, samples.completion_mask], axis=1)
        completion = samples.completion_mask.astype(np.float32)
        if cfg.mask_truncated:
            completion = completion * samples.finished[:, None]
        loss_mask = np.concatenate(
            [np.zeros_like(samples.prompt_mask, np.float32), completion], axis=1
        )
        old = np.concatenate(
            [np.zeros(samples.prompt_ids.shape, np.float32), samples.logprobs], axis=1
        )
        ref = np.zeros_like(old)
        if cfg.kl_beta > 0 or cfg.lora:  # the KL is logged whenever a reference exists
            with adapter_disabled(self.session.backend, self.session.model):
                ref = self.session.backend.logprobs(
                    self.session.model, ids, attention, cfg.temperature
                )
            ref = ref * loss_mask
        advantages = group_advantages(rewards, cfg.num_generations, cfg.advantage).astype(
            np.float32
        )
        batch = {
            "input_ids": ids,
            "attention_mask": attention,
            "loss_mask": loss_mask,
            "old_logprobs": old,
            "ref_logprobs": ref,
            "advantages": advantages,
        }
        return batch, width

    def microbatches(self, batch: dict) -> tuple[list[dict], list[float]]:
        cfg = self.cfg
        rows = batch["input_ids"].shape[0]
        count = min(cfg.grad_accum, rows)
        edges = np.linspace(0, rows, count + 1).astype(int)
        parts = [{k: v[a:b] for k, v in batch.items()} for a, b in zip(edges[:-1], edges[1:])]
        total_tokens = float(batch["loss_mask"].sum())
        for part in parts:
            tokens = float(part["loss_mask"].sum())
            if cfg.aggregation == "bnpo":
                normaliser = tokens
            elif cfg.aggregation == "dapo":
                normaliser = (
                    total_tokens / count
                )  # equal weights average the parts: sum / all tokens
            else:  # dr_grpo: a constant, so long and short completions weigh per token alike
                normaliser = part["input_ids"].shape[0] * cfg.max_new_tokens
            part["normaliser"] = np.float32(max(normaliser, 1.0))
        # grpo: parts weigh by their sequences (a mean over all sequences); the others add up
        # token sums already divided by their normaliser, so parts weigh equally.
        weights = (
            [float(p["input_ids"].shape[0]) for p in parts]
            if cfg.aggregation == "grpo"
            else [1.0] * count
        )
        return parts, weights

    def train_step(self, step: int) -> dict[str, float]:
        session, cfg = self.session, self.cfg
        session.backend.seed(cfg.seed + step)
        samples, rewards, reward_metrics = self.rollouts(step)
        batch, _ = self.build_batch(samples, rewards)
        parts, weights = self.microbatches(batch)
        for epoch in range(cfg.ppo_epochs):
            metrics = session.backend.train_step(
                session.model, session.optimizer, self.loss_fn, parts, weights
            )
            if epoch == 0:
                first = metrics
        groups = rewards.reshape(-1, cfg.num_generations)
        lengths = samples.completion_mask.sum(axis=1)
        return {
            **metrics,
            "logprob_gap": first["logprob_gap"],  # sampler vs trainer, before any update
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            **reward_metrics,
            "zero_variance_groups": float(np.mean(groups.std(axis=1) == 0)),
            "completion_length": float(lengths.mean()),
            "truncated": float(np.mean(~samples.finished)),
            "tokens": float(batch["attention_mask"].sum()),
        }

    def evaluate(self, step: int) -> dict[str, float]:
        if not self.math:
            return {}
        session = self.session
        report = evaluate_math(
            session.backend,
            session.model,
            session.info,
            self.math,
            MathEvalConfig(max_new_tokens=self.cfg.max_new_tokens),
        )
        return {
            "math_accuracy": report["accuracy"],
            "eval_completion_length": report["mean_completion_tokens"],
        }
