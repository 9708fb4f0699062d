"""The trunk run without padding (backend_shared/unpad.py): the plan's bookkeeping, and torch
hidden states packed against the same rows run padded."""

from __future__ import annotations

import numpy as np
import pytest

from mlxpost.backend_shared.unpad import unpad_plan

# left-padded prompts then right-padded completions, as a rollout batch lays them out
ROLLOUT_MASK = np.array(
    [
        [0, 0, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
    ]
)


def test_the_plan_moves_every_real_token_once_and_back():
    mask = ROLLOUT_MASK
    plan = unpad_plan(mask)
    assert plan is not None
    batch, width = mask.shape
    capacity = int(mask.sum(axis=1).max())
    assert plan.gather.shape == plan.segments.shape and plan.gather.shape[1] == capacity
    assert plan.gather.size <= 0.8 * mask.size
    real = np.flatnonzero(mask.reshape(-1))
    moved = plan.gather[plan.segments > 0]
    assert sorted(moved.tolist()) == real.tolist()  # each real token once
    assert np.all(plan.gather[plan.segments == 0] == batch * width)  # filler
    # Round trip: token t's packed slot holds t; padding goes to the appended zero row.
    ids = np.arange(batch * width)
    packed = np.append(ids, -1)[plan.gather].reshape(-1)
    restored = np.append(packed, -1)[plan.restore]
    assert np.array_equal(restored, np.where(mask.reshape(-1) > 0, ids, -1))
    # A row's tokens stay one segment, in order, and each packed row's segments count up.
    for row in plan.segments:
        ids_seen = [s for s in row if s > 0]
        assert ids_seen == sorted(ids_seen) and set(ids_seen) == set(range(1, max(ids_seen) + 1))
    for b in range(batch):
        slots = plan.restore[b * width : (b + 1) * width][mask[b] > 0]
        assert np.all(np.diff(slots) == 1)
    # The loss head's rows: exactly the positions whose next token is real, and back.
    predicts = mask[:, 1:].reshape(-1) > 0
    assert np.array_equal(plan.head_keep, np.flatnonzero(predicts))
    kept = np.append(plan.head_keep, -1)[plan.head_restore]
    assert np.array_equal(kept, np.where(predicts, np.arange(predicts.size), -1))


@pytest.mark.parametrize(
    "mask, why",
    [
        (np.ones((4, 6), int), "no padding"),
        (np.array([[1, 1, 0], [1, 1, 1]]), "too little to save"),
        (np.array([[1, 2, 2, 0], [1, 1, 0, 0], [1, 0, 0, 0]]), "already packed"),
        (np.array([[1, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]), "a gap"),
        (np.array([[1, 1, 0, 0, 0, 0]]), "one row"),
        (np.zeros((3, 4), int), "no real token"),
    ],
)
def test_no_plan_where_packing_does_not_apply(mask, why):
    assert unpad_plan(mask) is None, why


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2", "phi3"])
def test_torch_hidden_states_packed_equal_padded(tiny_dir, arch):
    """Every real position's final hidden state is the padded run's to float32 rounding,
    gradients included (a sliding-window model, gemma2 and phi3, among them); padding
    positions come back 0."""
    torch = pytest.importorskip("torch")
    from torch_backend import modeling

    model = modeling.load(str(tiny_dir / f"tiny-{arch}"), "float32", torch.device("cpu"))
    rng = np.random.default_rng(0)
    mask = torch.as_tensor(ROLLOUT_MASK)
    ids = torch.as_tensor(rng.integers(3, 200, size=mask.shape)) * mask
    assert unpad_plan(mask.numpy()) is not None
    weight = next(p for p in model.module.parameters() if p.ndim == 2)
    weight.requires_grad_(True)

    def run(packed: bool):
        weight.grad = None
        if packed:
            hidden = modeling.hidden_states(model, ids, mask)
        else:
            hidden = modeling.trunk(model, ids, mask)
        real = hidden[mask > 0]
        (real * torch.linspace(-1, 1, real.shape[-1])).sum().backward()
        return hidden.detach(), weight.grad.clone()

    packed, packed_grad = run(True)
    padded, padded_grad = run(False)
    real = mask > 0
    assert torch.count_nonzero(packed[~real]) == 0
    scale = padded[real].abs().max()
    assert torch.allclose(packed[real], padded[real], rtol=0, atol=2e-6 * scale)
    grad_scale = padded_grad.abs().max()
    assert grad_scale > 0
    assert torch.allclose(packed_grad, padded_grad, rtol=0, atol=2e-6 * grad_scale)


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_mlx_hidden_states_packed_equal_padded(tiny_dir, arch):
    """The same check on MLX, where the plan comes with the batch (MLXForward.bind): the packed
    trunk's states and a loss's gradients against the padded trunk's."""
    mx = pytest.importorskip("mlx.core")
    import mlx.nn as nn

    from mlxpost.mlx_backend import modeling
    from mlxpost.mlx_backend.backend import MLXBackend, MLXForward

    backend = MLXBackend()
    model = backend.load_model(str(tiny_dir / f"tiny-{arch}"))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 200, size=ROLLOUT_MASK.shape) * ROLLOUT_MASK
    batch = backend.batch_to_arrays({"input_ids": ids, "attention_mask": ROLLOUT_MASK})
    forward = MLXForward(model)
    batch = forward.bind(batch)
    plan = forward.plan(batch["attention_mask"])
    assert plan is not None and "unpad_gather" not in batch
    real = mx.array(ROLLOUT_MASK > 0)[..., None]
    weights = mx.linspace(-1, 1, modeling.model_hidden_size(model))

    def run(packed: bool):
        def loss(_):
            hidden = modeling.hidden_states(
                model, batch["input_ids"], batch["attention_mask"], plan if packed else None
            )
            return (mx.where(real, hidden, 0) * weights).sum(), hidden

        (_, hidden), grads = nn.value_and_grad(model.module, loss)(None)
        grad = next(g for _, g in nn.utils.tree_flatten(grads) if g.ndim == 2 and mx.any(g != 0))
        return np.array(hidden), np.array(grad)

    packed, packed_grad = run(True)
    padded, padded_grad = run(False)
    mask = ROLLOUT_MASK > 0
    assert np.count_nonzero(packed[~mask]) == 0
    scale = np.abs(padded[mask]).max()
    np.testing.assert_allclose(packed[mask], padded[mask], rtol=0, atol=2e-6 * scale)
    grad_scale = np.abs(padded_grad).max()
    np.testing.assert_allclose(packed_grad, padded_grad, rtol=0, atol=2e-6 * grad_scale)
