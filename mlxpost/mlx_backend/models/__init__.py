"""MLX causal-LM architectures, keyed by config.json ``model_type``.

We deliberately do not reuse mlx-lm's model code: it lacks sliding-window attention and
per-row position ids, both needed to match transformers on padded batches.
"""

from __future__ import annotations

import mlx.nn as nn

from . import gemma2, gpt2

ARCHITECTURES = {"gpt2": gpt2.Model, "gemma2": gemma2.Model}


def build_model(config: dict) -> nn.Module:
    """Instantiate the architecture named by ``config["model_type"]`` (random init)."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type](config)
