"""SFT on both backends: same seed, float32, no dropout, same data order -> same losses."""

from __future__ import annotations

import json

import numpy as np
import pytest

# Per-step losses may differ by float32 rounding only: a step is a forward and
# backward pass plus an AdamW update of rounding error ~1e-7 relative each, and
# 20 steps leave them ~1e-6 apart (measured 4e-7); 1e-5 relative bounds that.
RTOL = 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_sft_losses_agree_for_20_steps(tiny_dir, backends, tmp_path, arch):
    from mlxpost.algorithms.sft import SFT, SFTConfig
    from mlxpost.loop import setup, train

    losses = {}
    for backend in ("torch", "mlx"):
        cfg = SFTConfig(
            backend=backend,
            model=str(tiny_dir / f"tiny-{arch}"),
            output=str(tmp_path / backend),
            steps=20,
            batch_size=4,
            learning_rate=1e-3,
            max_length=128,
            eval_every=0,
            save_every=0,
            eval_limit=8,
            eval_math=0,
            eval_text=0,
        )
        session = setup("sft", cfg)
        train(session, SFT(session, cfg))
        with open(tmp_path / backend / "metrics.jsonl") as f:
            losses[backend] = np.array([row["loss"] for row in map(json.loads, f) if "loss" in row])
    assert len(losses["torch"]) == 20
    diff = np.abs(losses["torch"] - losses["mlx"]) / np.abs(losses["torch"])
    assert diff.max() <= RTOL, f"max relative diff {diff.max():.3g}, mean {diff.mean():.3g}"
    assert losses["torch"][-1] < losses["torch"][0], "SFT did not lower the loss"
