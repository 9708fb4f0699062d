"""Learning-rate schedule: linear warmup from 0, then cosine decay."""

from __future__ import annotations

import math

from mlxpost.backend import OptimConfig


def learning_rate(cfg: OptimConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based): both backends call this."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    floor = cfg.min_lr_ratio
    return cfg.learning_rate * (floor + (1.0 - floor) * cosine)
