"""MLX causal-LM architectures, keyed by config.json ``model_type``.

mlxpost runs its own model code rather than mlx-lm's: mlx-lm's models take one position
offset per batch (no per-row positions, which left-padded batches need) and several of them
leave sliding windows out; see README.md's architecture table for what was measured.
"""

from __future__ import annotations

import mlx.nn as nn

from . import decoder, gpt2

ARCHITECTURES = {
    "gpt2": gpt2.Model,
    **{model_type: decoder.Model for model_type in decoder.FAMILIES},
}


def build_model(config: dict) -> nn.Module:
    """Instantiate the architecture named by ``config["model_type"]`` (random init)."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type](config)
