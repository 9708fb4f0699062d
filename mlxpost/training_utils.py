"""Small numpy helpers both backends' training steps share."""

from __future__ import annotations

import math
from collections.abc import Sequence


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


def update_is_finite(loss: float, grad_norm: float) -> bool:
    """Whether an optimizer update may be applied: a NaN or inf loss or gradient norm
    means the step is skipped (and counted as `nonfinite_updates`) instead."""
    return math.isfinite(loss) and math.isfinite(grad_norm)
