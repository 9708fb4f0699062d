"""Each backend's training step skips an update whose loss or gradients are NaN or inf."""

from __future__ import annotations

import numpy as np
import pytest

from mlxpost.backend import LoraConfig, OptimConfig, get_backend
from mlxpost.functional import nll_loss, prediction_mask


def poisoned(ops, forward, batch):
    """The NLL, times NaN when the batch asks for it (so every gradient is NaN too)."""
    loss, metrics = nll_loss(ops, forward, batch)
    return loss * batch["scale"][0], metrics


@pytest.mark.parametrize("name", ["torch", "mlx"])
def test_a_non_finite_step_leaves_weights_and_optimizer_untouched(tiny_dir, name):
    pytest.importorskip("mlx.core" if name == "mlx" else "torch")
    backend = get_backend(name)
    model = backend.load_model(str(tiny_dir / "tiny-gpt2"))
    backend.attach_lora(model, LoraConfig(rank=2, alpha=4.0))
    optimizer = backend.make_optimizer(
        model, OptimConfig(learning_rate=1e-2, warmup_steps=0, total_steps=4)
    )
    ids = np.random.default_rng(0).integers(10, 200, size=(2, 12))
    mask = np.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": prediction_mask(mask)}

    def step(scale: float) -> dict:
        return backend.train_step(
            model, optimizer, poisoned, [{**batch, "scale": np.array([scale], np.float32)}]
        )

    assert step(1.0)["nonfinite_updates"] == 0.0
    before = backend.parameters(model, trainable_only=True)
    state = backend.optimizer_state(optimizer)
    for scale in (np.nan, np.inf):
        metrics = step(scale)
        assert metrics["nonfinite_updates"] == 1.0 and not np.isfinite(metrics["grad_norm"])
    after = backend.parameters(model, trainable_only=True)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    assert backend.optimizer_state(optimizer)["step"] == state["step"] == 1
    assert step(1.0)["nonfinite_updates"] == 0.0  # training goes on from the same state
    assert backend.optimizer_state(optimizer)["step"] == 2
