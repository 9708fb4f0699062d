"""--grad-checkpoint: every transformer block recomputed in the backward pass, same numbers.

For each architecture's tiny checkpoint and each backend, the loss and every LoRA gradient
with checkpointing equal those without (float32: the same operations run again), the
checkpointed path is really taken, and switching it off restores the plain one; one full
fine-tuning case per backend; MLX dropout draws the same masks when a block is recomputed;
and `sft --grad-checkpoint` runs in each backend.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from mlxpost.assets import default_data
from mlxpost.backend import LoraConfig, get_backend
from mlxpost.functional import nll_loss, prediction_mask

pytest.importorskip("torch")

ARCHITECTURES = ["gpt2", "gemma2", "llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"]
BACKENDS = ["torch", "mlx"]
RTOL = 1e-6


def backend_or_skip(name: str):
    if name == "mlx":
        pytest.importorskip("mlx.core")
    return get_backend(name)


def batch() -> dict:
    """Two rows, one left-padded, longer than the tiny models' sliding windows."""
    ids = np.random.default_rng(0).integers(3, 200, size=(2, 20))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": prediction_mask(mask)}


class Recomputations:
    """Counts block runs: torch, forward calls of the first layer's children (run again in
    the backward pass when checkpointed); MLX, calls of mx.checkpoint (traced once per step)."""

    def __init__(self, backend, model, monkeypatch):
        self.count = 0
        if backend.name == "torch":
            from transformers.modeling_layers import GradientCheckpointingLayer

            layer = next(
                m for m in model.module.modules() if isinstance(m, GradientCheckpointingLayer)
            )
            child = next(layer.children())
            child.register_forward_hook(lambda *_: self.bump())
        else:
            import mlx.core as mx

            checkpoint = mx.checkpoint

            def counting(fn):
                self.bump()
                return checkpoint(fn)

            monkeypatch.setattr(mx, "checkpoint", counting)

    def bump(self) -> None:
        self.count += 1


def grads_with_and_without(backend, model, monkeypatch):
    counter = Recomputations(backend, model, monkeypatch)
    runs = {}
    for setting in (False, True, False):
        backend.set_grad_checkpoint(model, setting)
        counter.count = 0
        backend.seed(1)
        loss, _, grads = backend.loss_and_grads(model, nll_loss, batch())
        runs.setdefault(setting, []).append((loss, grads, counter.count))
    (plain_loss, plain, plain_count), (again_loss, again, again_count) = runs[False]
    ((loss, grads, count),) = runs[True]
    if backend.name == "torch":
        assert (plain_count, again_count, count) == (1, 1, 2)  # recomputed in the backward
    else:
        assert plain_count == again_count == 0 and count == model.module.num_layers
    assert plain_loss == again_loss
    for name in plain:
        np.testing.assert_array_equal(again[name], plain[name], err_msg=name)
    return plain_loss, plain, loss, grads


def assert_same(plain_loss, plain, loss, grads):
    assert abs(loss - plain_loss) <= RTOL * abs(plain_loss), (loss, plain_loss)
    assert sorted(grads) == sorted(plain) and plain
    for name, value in plain.items():
        scale = float(np.abs(value).max()) or 1.0
        np.testing.assert_allclose(grads[name], value, rtol=0, atol=RTOL * scale, err_msg=name)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_gradients_equal_with_checkpointing(arch, backend_name, tiny_dir, monkeypatch):
    backend = backend_or_skip(backend_name)
    model = backend.load_model(str(tiny_dir / f"tiny-{arch}"))
    # Non-zero B, so every adapter weight has a gradient that depends on the recomputation.
    backend.attach_lora(model, LoraConfig(rank=4, alpha=8), seed=0)
    params = backend.parameters(model, trainable_only=True)
    rng = np.random.default_rng(1)
    backend.set_parameters(
        model,
        {n: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for n, v in params.items()},
    )
    assert_same(*grads_with_and_without(backend, model, monkeypatch))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_full_fine_tuning_gradients_equal_with_checkpointing(backend_name, tiny_dir, monkeypatch):
    backend = backend_or_skip(backend_name)
    model = backend.load_model(str(tiny_dir / "tiny-llama"))
    plain_loss, plain, loss, grads = grads_with_and_without(backend, model, monkeypatch)
    assert any("embed_tokens" in name for name in grads)  # every weight trains
    assert_same(plain_loss, plain, loss, grads)


def test_mlx_dropout_masks_are_recomputed_alike():
    """A block whose dropout is on gets, in the backward pass, the masks of its forward pass:
    d sum(dropout(x) * w) / dx is exactly the kept positions' w / keep."""
    mx = pytest.importorskip("mlx.core")
    import mlx.nn as nn

    from mlxpost.mlx_backend.models.gpt2 import checkpointed_block

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.w = mx.arange(1, 257, dtype=mx.float32)

        def __call__(self, x, cache):
            return self.drop(x) * self.w

    block = Block()
    mx.random.seed(0)

    def objective(x):
        y = checkpointed_block(block, x)
        return y.sum(), y

    (_, y), grad = mx.value_and_grad(objective)(mx.ones((256,)))
    kept = np.array(y) != 0
    assert 0 < kept.sum() < 256
    expected = np.where(kept, np.arange(1, 257) * 2.0, 0.0)
    np.testing.assert_array_equal(np.array(grad), expected)
    assert block.drop.__class__ is nn.Dropout  # the block is left as it was


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_sft_runs_with_grad_checkpoint(backend_name, tiny_dir, tmp_path):
    if backend_name == "mlx":
        pytest.importorskip("mlx.core")
    from mlxpost.cli import main

    data = tmp_path / "sft.jsonl"
    with open(default_data("sft"), encoding="utf-8") as f:
        data.write_text("".join(next(f) for _ in range(8)), encoding="utf-8")
    out = tmp_path / "run"
    args = ["sft", "--model", str(tiny_dir / "tiny-qwen3"), "--data", str(data)]
    args += ["--backend", backend_name, "--output", str(out), "--grad-checkpoint"]
    args += ["--steps", "2", "--batch-size", "2", "--eval-every", "0", "--save-every", "0"]
    args += ["--eval-math", "0", "--eval-text", "0", "--lora-dropout", "0.1"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output[-2000:]
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [row for row in map(json.loads, f) if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2]
    assert "grad_checkpoint: true" in (out / "config.yaml").read_text(encoding="utf-8")


@pytest.mark.parametrize("arch", ["gemma2", "phi3"])
def test_parity_checks_checkpointed_gradients(arch, tiny_dir):
    """`mlxpost parity`'s check: each backend's checkpointed gradients against its own
    unchecked ones and against the other backend's, past the sliding window."""
    pytest.importorskip("mlx.core")
    from mlxpost.parity import ParityRun, ParitySetup

    run = ParityRun(ParitySetup(model=str(tiny_dir / f"tiny-{arch}"), batch_size=2))
    check = run.check_checkpointed_grads()
    assert check.name.startswith("gradients with --grad-checkpoint")
    assert check.ok and check.max_abs_diff <= check.tolerance, check
    assert "torch vs its unchecked 0.00e+00" in check.detail, check.detail
    # Switched off again afterwards: a later gradient check runs the plain path.
    torch_model, mlx_model = run.models
    assert not any(
        getattr(m, "gradient_checkpointing", False) for m in torch_model.module.modules()
    )
    assert not mlx_model.module.grad_checkpoint
