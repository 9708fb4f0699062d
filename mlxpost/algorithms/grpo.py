"""GRPO (Shao et al., 2024, DeepSeekMath) and its variants.

Each step samples `num_generations` completions per prompt (one shared prompt
prefill), scores them with the reward functions, turns rewards into
group-relative advantages in numpy, and takes `ppo_epochs` clipped policy
gradient passes over the rollouts with the old (behaviour) logprobs kept.

Variants, by option:
- advantages: group mean-centred, scaled by the group std (GRPO), the batch std,
  or not at all (Dr. GRPO, Liu et al., 2025); or rank-based within the group. The
  std is Bessel-corrected (n - 1) as in TRL, or the population's (--advantage-std).
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
`logprob_gap`) unless --importance-correction is on, and the KL term is off by default (beta = 0), as in DAPO and
Dr. GRPO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np

from mlxpost import distributed
from mlxpost.algorithms.rollouts import RLConfig, Rollouts
from mlxpost.batching import split_batch
from mlxpost.config import option
from mlxpost.errors import UserError
from mlxpost.functional import head_terms, kl_estimate, masked_mean, masked_sum
from mlxpost.loop import Algorithm, Session

ADVANTAGES = ("group", "batch", "none", "rank")
AGGREGATIONS = ("grpo", "bnpo", "dapo", "dr_grpo")
STD_KINDS = ("bessel", "population")


@dataclass
class GRPOConfig(RLConfig):
    advantage: str = option(
        "group",
        "Advantage scale: group std (GRPO), batch std, none (Dr. GRPO), or rank within the group.",
        ADVANTAGES,
    )
    clip_low: float = option(
        0.2, "Lower clip range: ratios below 1 - clip_low are clipped.", ge=0, lt=1
    )
    clip_high: float = option(
        0.2, "Upper clip range: ratios above 1 + clip_high are clipped (DAPO: 0.28).", ge=0
    )
    importance: str = option(
        "token", "Importance ratio per token (GRPO) or per sequence (GSPO).", ("token", "sequence")
    )
    aggregation: str = option("grpo", "How token losses are averaged.", AGGREGATIONS)
    advantage_std: str = option(
        "bessel",
        "Std that scales group and batch advantages: bessel (divides by n - 1, as TRL and "
        "torch.std) or population (divides by n).",
        STD_KINDS,
    )
    log_kl: bool = option(
        True,
        "Log the KL to the reference (adapter off) even when --kl-beta is 0; it costs one more forward pass per step.",
        flag="--log-kl/--no-log-kl",
    )

    def __post_init__(self):
        super().__post_init__()
        if self.rewards.strip() == "none":
            raise UserError("--rewards none leaves GRPO nothing to score")
        if self.num_generations < 2 and self.advantage != "none":
            raise UserError("--num-generations must be at least 2 for group advantages")


# ---- the math ----


def group_advantages(
    rewards: np.ndarray,
    group_size: int,
    scale: str,
    std: str = "bessel",
    eps: float = 1e-4,
    batch_std: float | None = None,
) -> np.ndarray:
    """Group-relative advantages of (N,) rewards ordered prompt-major in groups of group_size.

    "group" and "batch" divide the centred rewards by std + eps, the std Bessel-corrected
    (n - 1, TRL's torch.std) or the population's (n): with 8 completions the population
    std is 0.935x the corrected one, so its advantages are 7% larger. `batch_std` is the
    std the "batch" scale divides by when given (every rank's rewards, already corrected
    as `std` says); by default these rewards'."""
    groups = rewards.reshape(-1, group_size)  # (P, G)
    if scale == "rank":
        # Ranks (ties averaged) centred and scaled to [-1, 1]: robust to the rewards' scale.
        ranks = np.argsort(np.argsort(groups, axis=1, kind="stable"), axis=1).astype(np.float64)
        for row in range(groups.shape[0]):
            for value in np.unique(groups[row]):
                tied = groups[row] == value
                ranks[row, tied] = ranks[row, tied].mean()
        return ((ranks - (group_size - 1) / 2) / max((group_size - 1) / 2, 1)).reshape(-1)
    ddof = 1 if std == "bessel" else 0
    centred = groups - groups.mean(axis=1, keepdims=True)
    if scale == "group":
        centred = centred / (groups.std(axis=1, ddof=ddof, keepdims=True) + eps)
    elif scale == "batch":
        centred = centred / ((rewards.std(ddof=ddof) if batch_std is None else batch_std) + eps)
    return centred.reshape(-1)


def grpo_loss(ops, forward, batch, cfg: GRPOConfig):
    """Clipped surrogate (+ beta * KL) over completion tokens, aggregated per cfg.aggregation.

    batch: input_ids, attention_mask (prompt + completion), loss_mask (completion tokens),
    old_logprobs, ref_logprobs (aligned, 0 outside completions), advantages (B,),
    normaliser (scalar tokens for bnpo/dapo/dr_grpo); optionally importance_weights (B, T),
    the detached sampler/trainer correction of algorithms/importance.py, which multiplies each
    token's clipped surrogate (not the KL term), as in TRL.
    """
    ids, mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    terms = head_terms(ops, forward, ids, mask, temperature=cfg.temperature, entropy=True)
    logprobs = terms["logprobs"]  # (B, T)
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
    if "importance_weights" in batch:  # sampler/trainer mismatch correction (importance.py)
        per_token = per_token * batch["importance_weights"]
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
        "entropy": masked_mean(ops, terms["entropy"], loss_mask),  # no gradient: a metric
        "logprob_gap": masked_mean(ops, ops.abs(logprobs - batch["old_logprobs"]), loss_mask),
    }
    return loss, metrics


# ---- the loop ----


class GRPO(Algorithm):
    def __init__(self, session: Session, cfg: GRPOConfig):
        self.session, self.cfg = session, cfg
        self.rollouts = Rollouts(session, cfg, "grpo")
        self.loss_fn = partial(grpo_loss, cfg=cfg)

    def microbatches(self, batch: dict) -> tuple[list[dict], list[float]]:
        """The rollout batch in --grad-accum parts with their weights and token normalisers.

        In a data-parallel run (mlxpost.distributed) microbatch k is the k-th part of every
        rank's rows and the training step weighs each rank's part by its share of all
        parts: the token counts are all-reduced so the objective is the one-process one."""
        cfg, world = self.cfg, distributed.world()
        # grpo: parts weigh by their sequences (a mean over all sequences); the others add up
        # token sums already divided by their normaliser, so parts weigh equally.
        parts, weights = split_batch(batch, cfg.grad_accum, weigh="rows")
        count = len(parts)
        if cfg.aggregation != "grpo":
            weights = [1.0] * count
        part_tokens = np.zeros(cfg.grad_accum)
        part_tokens[:count] = [part["loss_mask"].sum() for part in parts]
        if world.size > 1:
            part_tokens = world.all_sum(part_tokens)
            count = int(world.all_sum([count])[0])  # parts of every rank, weighed equally
        total_tokens = float(part_tokens.sum())
        for index, part in enumerate(parts):
            if cfg.aggregation == "bnpo":
                # the mean over microbatch k's tokens on every rank; each of the ranks' shares
                # of it is weighed 1 / (ranks * microbatches) by the step, hence the * size
                normaliser = part_tokens[index] / world.size
            elif cfg.aggregation == "dapo":
                normaliser = total_tokens / count  # equal weights: sum / all tokens
            else:  # dr_grpo: a constant, so long and short completions weigh per token alike
                normaliser = part["input_ids"].shape[0] * cfg.max_new_tokens
            part["normaliser"] = np.float32(max(normaliser, 1.0))
        return parts, weights

    def train_step(self, step: int) -> dict[str, float]:
        session, cfg = self.session, self.cfg
        session.backend.seed(distributed.rank_seed(cfg.seed + step))  # a rank's own draws
        rollout = self.rollouts.sample(step)
        rewards, reward_metrics = self.rollouts.score(rollout)
        _, reward_std, count = distributed.mean_and_std(rewards)  # over every rank's rewards
        batch_std = reward_std  # the "batch" scale's, corrected as --advantage-std says
        if cfg.advantage_std == "bessel" and count > 1:
            batch_std = reward_std * math.sqrt(count / (count - 1))
        # The KL needs the reference's logprobs: in the loss when beta > 0, else only logged.
        has_reference = cfg.kl_beta > 0 or (cfg.lora and cfg.log_kl)
        batch = {
            "input_ids": rollout.input_ids,
            "attention_mask": rollout.attention_mask,
            "loss_mask": rollout.loss_mask,
            "old_logprobs": rollout.old_logprobs,
            "ref_logprobs": self.rollouts.reference_logprobs(rollout)
            if has_reference
            else np.zeros_like(rollout.old_logprobs),
            "advantages": group_advantages(
                rewards, cfg.num_generations, cfg.advantage, cfg.advantage_std, batch_std=batch_std
            ).astype(np.float32),
            **rollout.correction,
        }
        parts, weights = self.microbatches(batch)
        skipped = 0.0
        for epoch in range(cfg.ppo_epochs):
            metrics = session.backend.train_step(
                session.model, session.optimizer, self.loss_fn, parts, weights
            )
            skipped += metrics["nonfinite_updates"]
            if epoch == 0:
                first = metrics
        metrics["nonfinite_updates"] = skipped
        if not has_reference:
            metrics.pop("kl", None)  # measured against zeros: meaningless
        groups = rewards.reshape(-1, cfg.num_generations)
        return {
            **metrics,
            "logprob_gap": first["logprob_gap"],  # sampler vs trainer, before any update
            "reward": float(rewards.mean()),
            "reward_std": reward_std,
            **reward_metrics,
            "zero_variance_groups": float(np.mean(groups.std(axis=1) == 0)),
            **self.rollouts.summary(rollout),
        }

    def evaluate(self, step: int) -> dict[str, float]:
        return self.rollouts.evaluate()
