"""Value-and-grad, AdamW, clipping and accumulation, mirroring mlx_backend/training.py.

In a data-parallel run (mlxpost/distributed.py) each rank weighs its microbatches by
their share of every rank's, and the weighted gradients, losses and metrics are summed
over the ranks before clipping, so every rank applies the global batch's update."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mlxpost import distributed
from mlxpost.backend import OptimConfig
from mlxpost.backend_shared.training import (
    average_metrics,
    finite_update,
    global_weights,
    learning_rate,
)
from torch_backend import fsdp


class TorchOptimizer:
    """AdamW over a model's trainable parameters, with the shared LR schedule."""

    def __init__(self, params: dict[str, torch.nn.Parameter], cfg: OptimConfig):
        self.params = params
        self.cfg = cfg
        self.step = 0
        self.adamw = torch.optim.AdamW(
            list(params.values()),
            lr=cfg.learning_rate,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )

    def state(self) -> dict:
        """Canonical numpy state: {"step", "m.<name>", "v.<name>"}, the same in both backends."""
        out: dict = {"step": self.step}
        for name, param in self.params.items():
            slot = self.adamw.state.get(param, {})
            if slot:  # a sharded model's moments are gathered: every rank calls this
                out[f"m.{name}"] = fsdp.full(slot["exp_avg"].detach()).cpu().numpy()
                out[f"v.{name}"] = fsdp.full(slot["exp_avg_sq"].detach()).cpu().numpy()
        return out

    def load_state(self, state: dict) -> None:
        self.step = int(state["step"])
        for name, param in self.params.items():
            if f"m.{name}" not in state:
                continue
            moments = {
                key: fsdp.like(torch.as_tensor(state[f"{slot}.{name}"]), param).clone()
                for key, slot in (("exp_avg", "m"), ("exp_avg_sq", "v"))
            }
            self.adamw.state[param] = {"step": torch.tensor(float(self.step)), **moments}


def clip_grad_norm(grads: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Global L2 norm (float32); grads are scaled by max_norm / (norm + 1e-6) when above it.
    A sharded model's gradients are shards: their squares are summed over the ranks."""
    squares = sum(torch.sum(g.float() ** 2) for g in grads if not fsdp.is_sharded(g))
    shards = [fsdp.local(g) for g in grads if fsdp.is_sharded(g)]
    if shards:
        summed = distributed.world().all_sum(
            [float(sum(torch.sum(g.float() ** 2) for g in shards))]
        )
        squares = squares + torch.tensor(summed[0], dtype=torch.float32)
    norm = torch.sqrt(torch.as_tensor(squares, dtype=torch.float32))
    if max_norm is not None:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            local = fsdp.local(g)
            local.mul_(scale.to(local.device, local.dtype))
    return norm


def accumulate_grads(forward, ops, loss_fn, microbatches, weights, to_tensors):
    """Backpropagate each weighted microbatch loss; gradients add up in .grad."""
    losses, metrics = [], []
    for batch, weight in zip(microbatches, weights):
        loss, batch_metrics = loss_fn(ops, forward, to_tensors(batch))
        (loss * weight).backward()
        losses.append(float(loss.detach()))
        metrics.append(
            {
                k: float(v.detach()) if torch.is_tensor(v) else float(v)
                for k, v in batch_metrics.items()
            }
        )
    return float(np.dot(losses, weights)), average_metrics(metrics, weights)


def train_step(
    optimizer: TorchOptimizer,
    forward,
    ops,
    loss_fn,
    microbatches: Sequence[dict],
    weights: Sequence[float] | None,
    to_tensors,
) -> dict[str, float]:
    world = distributed.world()
    weights = global_weights(len(microbatches), weights, world)
    if world.sharded:  # every rank runs as many passes: FSDP's collectives must pair up
        most = max(world.all_gather(len(microbatches)))
        padding = most - len(microbatches)
        microbatches = [*microbatches, *[microbatches[-1]] * padding]
        weights = [*weights, *[0.0] * padding]
    optimizer.adamw.zero_grad(set_to_none=True)
    loss, metrics = accumulate_grads(forward, ops, loss_fn, microbatches, weights, to_tensors)
    if world.size > 1:
        loss, metrics = sum_over_ranks(world, optimizer, loss, metrics)
    params = [p for p in optimizer.params.values() if p.grad is not None]
    grad_norm = float(clip_grad_norm([p.grad for p in params], optimizer.cfg.max_grad_norm))

    def update(lr: float) -> None:
        for group in optimizer.adamw.param_groups:
            group["lr"] = lr
        optimizer.adamw.step()
        optimizer.step += 1

    lr = learning_rate(optimizer.cfg, optimizer.step)
    return finite_update(update, loss, grad_norm, lr, metrics)


def sum_over_ranks(world, optimizer: TorchOptimizer, loss: float, metrics: dict):
    """Every rank's weighted gradients, loss and metrics added up (the DDP all-reduce); a
    sharded model's shards are sums over the ranks already (FSDP's reduce-scatter)."""
    for p in optimizer.params.values():
        if p.grad is None:  # a parameter this rank's batch did not reach still takes part
            p.grad = torch.zeros_like(p)
    world.sum_gradients([p.grad for p in optimizer.params.values() if not fsdp.is_sharded(p)])
    summed = world.all_sum([loss, *metrics.values()])
    return float(summed[0]), dict(zip(metrics, map(float, summed[1:])))
