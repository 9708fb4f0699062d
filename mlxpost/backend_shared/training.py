"""The numpy parts of both backends' training steps (`mlx_backend/training.py`,
`torch_backend/training.py`): the learning-rate schedule, microbatch weights for gradient
accumulation (over every rank's microbatches in data-parallel runs), and skipping updates
whose loss or gradient is not finite."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence

from mlxpost.backend import OptimConfig
from mlxpost.distributed import World


def learning_rate(cfg: OptimConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from 0, then cosine
    decay to learning_rate * min_lr_ratio."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    floor = cfg.min_lr_ratio
    return cfg.learning_rate * (floor + (1.0 - floor) * cosine)


def normalise_weights(count: int, weights: Sequence[float] | None) -> list[float]:
    """Microbatch weights for gradient accumulation: equal by default, always summing to 1."""
    if count == 0:
        raise ValueError("a training step needs at least one microbatch")
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} microbatches")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("microbatch weights must sum to a positive number")
    return [float(w) / total for w in weights]


def global_weights(count: int, weights: Sequence[float] | None, world: World) -> list[float]:
    """This rank's microbatch weights as shares of every rank's: summed over the ranks they
    make 1, so the all-reduced sum of the weighted gradients is the gradient of the whole
    global batch (equal weights by default; equal too when no rank's weights add up to
    anything, as when no microbatch holds a loss token)."""
    if count == 0:
        raise ValueError("a training step needs at least one microbatch")
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} microbatches")
    if min(weights) < 0:
        raise ValueError("microbatch weights must not be negative")
    total, total_count = world.all_sum([sum(weights), count])
    if total <= 0:
        return [1.0 / total_count] * count
    return [w / total for w in weights]


def average_metrics(metrics: list[dict[str, float]], weights: Sequence[float]) -> dict[str, float]:
    keys = metrics[0].keys() if metrics else []
    return {k: float(sum(w * m[k] for m, w in zip(metrics, weights))) for k in keys}


def finite_update(
    update: Callable[[float], None], loss: float, grad_norm: float, lr: float, metrics: dict
) -> dict[str, float]:
    """Apply `update(lr)` unless the loss or the gradient norm is NaN or inf (a NaN or inf
    in any gradient makes the norm non-finite); then the step is skipped and counted as
    `nonfinite_updates`. Returns the step's metrics."""
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        update(lr)
    return {
        **metrics,
        "loss": loss,
        "grad_norm": grad_norm,
        "learning_rate": lr,
        "nonfinite_updates": float(not finite),
    }


def process_peak_memory_gb() -> float | None:
    """The process's resident high-water mark in GB (2**30 bytes); None where the platform
    has no getrusage."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes / KiB
