"""Fully sharded data parallelism for full fine-tuning (`--fsdp`): torch's FSDP2 (`fully_shard`).

Each rank holds 1/world of every weight, gradient and AdamW moment (DTensors sharded on their
first dimension). The units: every transformer block, and a root unit (`Shell`) holding the
rest, embeddings, final norm and head together, so a tied embedding stays one parameter.

* Training passes run inside the root unit's forward (`Shell.forward` calls the loss), so
  that FSDP gathers the root's weights for the whole loss (its chunked head included, whose
  backward recomputes chunks with them) and reduce-scatters their gradients at the end of
  the backward; each block gathers its own weights around its forward and backward.
  Gradients are summed over the ranks, not averaged: each rank's loss is already weighed by
  its share of the global batch (backend_shared/training.py, `global_weights`).
* Passes without gradients (logprobs, scores, sampling, evaluation) gather the whole model
  once (`gathered`), run locally, and shard it again: sampling's loop may run a different
  number of steps on each rank, and FSDP's collectives must match across the ranks.
* Reading the weights or the optimizer state (checkpoints) gathers them: every rank must
  take part. Writing them is local: each rank keeps its own shard of the full arrays.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


class Shell(nn.Module):
    """The root FSDP unit: owns the causal LM; its forward runs a function (a loss) over it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.inner = module

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def shard(module: nn.Module, blocks: list[nn.Module]) -> Shell:
    """Shard `module` (a transformers causal LM) over the default process group: each of
    `blocks` one unit, the rest the root unit. Returns the root."""
    for block in blocks:
        fully_shard(block)
    shell = Shell(module)
    fully_shard(shell, reshard_after_forward=False)  # the head's chunks need it in backward
    for unit in units(shell):
        # A plain sum over the ranks (see above); gloo has no pre-multiplied sum.
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    # FSDP takes the first unit run as its root: run the shell first, so that a pass without
    # gradients (an evaluation, sampling) that calls a block first does not make it a root.
    shell(lambda: None)
    shell.reshard()
    return shell


def units(shell: nn.Module) -> list[FSDPModule]:
    return [m for m in shell.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(shell: Shell | None) -> Iterator[None]:
    """Every unit's whole weights on every rank for the duration (no gradients); sharded again
    after. Without a shell (an unsharded model) nothing to do."""
    if shell is None:
        yield
        return
    found = units(shell)
    for unit in found:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in found:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not shell, recurse=False)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every rank calls it), else the tensor."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value`, a whole tensor every rank holds, laid out as `param`: its own shard, taken
    locally (no communication), for a sharded parameter."""
    if isinstance(param, DTensor):
        return distribute_tensor(
            value.to(param.device), param.device_mesh, param.placements, src_data_rank=None
        )
    return value


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (a view: writing it writes the shard)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)
