"""Small numpy helpers both backends' training steps share."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


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
