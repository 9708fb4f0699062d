"""Value-and-grad, AdamW, clipping and accumulation, mirroring torch_backend/training.py.

In a data-parallel run (mlxpost/distributed.py) each rank weighs its microbatches by
their share of every rank's, and the weighted gradients, losses and metrics are summed
over the ranks before clipping, so every rank applies the global batch's update."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlxpost import distributed
from mlxpost.backend import OptimConfig
from mlxpost.backend_shared.training import (
    average_metrics,
    finite_update,
    global_weights,
    learning_rate,
)


class MLXOptimizer:
    """AdamW over a model's trainable parameters, with the shared LR schedule.

    mlx's AdamW with bias_correction=True is torch's AdamW update:
    p <- p(1 - lr*wd) - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
    """

    def __init__(self, module: nn.Module, cfg: OptimConfig):
        self.module = module
        self.cfg = cfg
        self.step = 0
        self.adamw = optim.AdamW(
            learning_rate=cfg.learning_rate,
            betas=[cfg.beta1, cfg.beta2],
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            bias_correction=True,
        )
        self.adamw.init(module.trainable_parameters())

    def state(self) -> dict:
        """Canonical numpy state: {"step", "m.<name>", "v.<name>"}, the same in both backends."""
        out: dict = {"step": self.step}
        if self.step == 0:
            return out
        for name, value in tree_flatten(self.adamw.state):
            if name.endswith(".m") or name.endswith(".v"):
                slot, param = name[-1], name[:-2]
                out[f"{slot}.{param}"] = np.array(value)
        return out

    def load_state(self, state: dict) -> None:
        self.step = int(state["step"])
        items = [("step", mx.array(self.step, dtype=mx.uint64))]
        for name, _ in tree_flatten(self.module.trainable_parameters()):
            if f"m.{name}" in state:
                items.append((f"{name}.m", mx.array(state[f"m.{name}"])))
                items.append((f"{name}.v", mx.array(state[f"v.{name}"])))
        loaded = tree_unflatten(items)
        self.adamw.state.update(loaded)


def clip_grad_norm(grads, max_norm: float | None):
    """Global L2 norm (float32); grads are scaled by max_norm / (norm + 1e-6) when above it."""
    leaves = [g for _, g in tree_flatten(grads)]
    norm = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for g in leaves))
    if max_norm is None:
        return grads, norm
    scale = mx.minimum(max_norm / (norm + 1e-6), 1.0)
    return tree_map(lambda g: g * scale.astype(g.dtype), grads), norm


def grad_function(model, forward, ops, loss_fn, compile: bool):
    """value_and_grad of loss_fn over the trainable parameters, compiled once per setting.

    mx.compile traces the forward and backward into one graph (about 2x faster
    even on CPU) and retraces by itself when batch shapes change. The trace
    bakes in Python-level switches, so the cache is keyed on the adapter's
    on/off state and on train/eval mode, and dropped when the model changes.
    """
    module = model.module
    switches = tuple((layer.enabled, layer.lora_dropout.training) for layer in model.lora.values())
    key = (loss_fn, compile, switches)
    if key not in model.grad_functions:

        def objective(batch):
            try:  # the trunk's unpadding plan, when the batch has one (MLXForward.bind)
                return loss_fn(ops, forward, forward.bind(batch))
            finally:
                forward.plans.clear()

        value_and_grad = nn.value_and_grad(module, objective)
        if compile:
            state = [module.state, mx.random.state]
            value_and_grad = mx.compile(value_and_grad, inputs=state, outputs=state)
        model.grad_functions[key] = value_and_grad
    return model.grad_functions[key]


def accumulate_grads(model, forward, ops, loss_fn, microbatches, weights, to_arrays, compile=True):
    """Weighted sum of each microbatch's gradients, with its losses and metrics."""
    value_and_grad = grad_function(model, forward, ops, loss_fn, compile)
    total, losses, metrics = None, [], []
    for batch, weight in zip(microbatches, weights):
        (loss, batch_metrics), grads = value_and_grad(to_arrays(batch))
        grads = tree_map(lambda g, w=weight: g * w, grads)
        total = grads if total is None else tree_map(mx.add, total, grads)
        mx.eval(total, loss, batch_metrics)
        losses.append(loss.item())
        metrics.append({k: float(v) for k, v in batch_metrics.items()})
    return total, float(np.dot(losses, weights)), average_metrics(metrics, weights)


def train_step(
    model,
    optimizer: MLXOptimizer,
    forward,
    ops,
    loss_fn,
    microbatches: Sequence[dict],
    weights: Sequence[float] | None,
    to_arrays,
    compile: bool = True,
) -> dict[str, float]:
    world = distributed.world()
    weights = global_weights(len(microbatches), weights, world)
    module = optimizer.module
    grads, loss, metrics = accumulate_grads(
        model, forward, ops, loss_fn, microbatches, weights, to_arrays, compile
    )
    if world.size > 1:  # every rank's weighted gradients, loss and metrics added up
        grads = world.sum_gradients(grads)
        summed = world.all_sum([loss, *metrics.values()])
        loss, metrics = float(summed[0]), dict(zip(metrics, map(float, summed[1:])))
    grads, grad_norm = clip_grad_norm(grads, optimizer.cfg.max_grad_norm)

    def update(lr: float) -> None:
        optimizer.adamw.learning_rate = lr
        optimizer.adamw.update(module, grads)
        mx.eval(module.parameters(), optimizer.adamw.state)
        optimizer.step += 1

    lr = learning_rate(optimizer.cfg, optimizer.step)
    return finite_update(update, loss, grad_norm.item(), lr, metrics)
