"""Importance-sampling correction for a mismatch between the sampler and the trainer.

When the rollout engine's logprobs differ from the trainer's on the same tokens (another
kernel, another engine such as vLLM, lower precision), the samples come from a slightly
different policy than the one trained. TRL's `vllm_importance_sampling_correction` then
reweights each token's policy loss by the ratio trainer / sampler, detached, and this module
follows its definitions (GRPOTrainer, TRL 1.x):

    log_ratio = (trainer_logprobs - sampler_logprobs) * mask       per token
              summed over each completion's tokens                  sequence_* modes
    ratio     = exp(log_ratio)
    weight    = clip(ratio, cap_min, cap_max)                        *_truncate (TIS)
              = ratio where cap_min <= ratio <= cap_max, else 0      *_mask (MIS)

With the correction on, the trainer's logprobs at sampling time replace the sampler's as the
old logprobs of the clipped ratio, as TRL does. mlxpost's own samplers agree with the trainer
to float32 rounding, so it is off by default; the mismatch is logged whenever it is computed.
"""

from __future__ import annotations

import numpy as np

MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def importance_weights(
    trainer_logprobs: np.ndarray,
    sampler_logprobs: np.ndarray,
    mask: np.ndarray,
    mode: str,
    cap_max: float,
    cap_min: float | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """(N, T) weights for the per-token policy loss (0 outside `mask`) and the mismatch
    metrics: the mean and max |trainer - sampler| logprob gap over the masked tokens, and the
    min/mean/max ratio (over tokens, or over sequences in the sequence modes) and, in the mask
    modes, the share of them masked out."""
    if mode not in MODES[1:]:
        raise ValueError(f"unknown importance correction {mode!r}; choose one of {MODES[1:]}")
    mask = mask.astype(np.float64)
    token_log_ratio = (trainer_logprobs.astype(np.float64) - sampler_logprobs) * mask  # (N, T)
    counted = mask > 0
    sequence = mode.startswith("sequence")
    log_ratio = token_log_ratio.sum(axis=1, keepdims=True) if sequence else token_log_ratio
    ratio = np.exp(log_ratio)
    low = -np.inf if cap_min is None else cap_min
    if mode.endswith("truncate"):
        weights = np.clip(ratio, low, cap_max)
    else:
        weights = np.where((ratio > cap_max) | (ratio < low), 0.0, ratio)
    rated = counted.any(axis=1) if sequence else counted  # the sequences or tokens rated
    picked = ratio[:, 0][rated] if sequence else ratio[rated]
    gap = np.abs(token_log_ratio)
    metrics = {
        "sampler_gap": float(gap[counted].mean()) if counted.any() else 0.0,
        "sampler_gap_max": float(gap[counted].max()) if counted.any() else 0.0,
        "importance_ratio_min": float(picked.min()) if picked.size else 1.0,
        "importance_ratio_mean": float(picked.mean()) if picked.size else 1.0,
        "importance_ratio_max": float(picked.max()) if picked.size else 1.0,
    }
    if mode.endswith("mask"):
        zeroed = (weights[:, 0][rated] if sequence else weights[rated]) == 0
        metrics["importance_masked"] = float(zeroed.mean()) if zeroed.size else 0.0
    weights = np.broadcast_to(weights, mask.shape) * mask
    return weights.astype(np.float32), metrics
