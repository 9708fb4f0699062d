"""LoRA layers on transformers modules, mirroring mlxpost/mlx_backend/lora.py.

A wrapped projection keeps the original module as `base_layer` and adds
`lora_A` (r, in) and `lora_B` (out, r) linears, so parameter names are PEFT's.
Adapter weights stay float32 whatever the model dtype; the update is computed
in float32 and cast back, as PEFT does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from mlxpost.adapters import init_lora_weights, select_modules


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float):
        super().__init__()
        if isinstance(base_layer, Conv1D):
            in_features, out_features = base_layer.weight.shape  # GPT-2 stores (in, out)
        elif isinstance(base_layer, nn.Linear):
            out_features, in_features = base_layer.weight.shape
        else:
            raise TypeError(
                f"LoRA supports Linear and Conv1D layers, not {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        device = base_layer.weight.device
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_dropout.train(False)  # on only inside training steps (Backend.dropout_on)
        self.scale = scale
        self.enabled = True
        self.merged: torch.Tensor | None = None  # set inside merged_for_inference only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base_layer(x)
        if self.merged is not None:
            return base_operation(self.base_layer, x, self.merged)
        y = self.base_layer(x)
        low = self.lora_A(self.lora_dropout(x.float()))  # (..., r)
        if y.dtype == torch.float32:
            # y + scale * (low @ B^T) as one addmm: the (tokens x out) update and its scaled
            # copy are never tensors of their own (the same sum to float32 rounding). B^T is
            # made contiguous (r x out, small) so that the backward computes B's gradient as
            # low^T @ grad, not grad^T @ low: at r = 8 the latter ran 3-4x slower on a CPU
            # (12 against 4 ms at 4,000 tokens x 1,024 outputs; measured on 2 cores).
            flat = torch.addmm(
                y.reshape(-1, y.shape[-1]),
                low.reshape(-1, low.shape[-1]),
                self.lora_B.weight.t().contiguous(),
                alpha=self.scale,
            )
            return flat.view(y.shape)
        update = self.lora_B(low) * self.scale
        return y + update.to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the update folded in, in the base layer's layout."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scale  # (out, in)
        weight = self.base_layer.weight
        if isinstance(self.base_layer, Conv1D):
            delta = delta.T
        return (weight.float() + delta).to(weight.dtype)


def base_operation(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the base layer computes, with `weight` (in its layout) in place of its own."""
    if isinstance(base, Conv1D):  # Conv1D.forward's operations
        out = torch.addmm(base.bias, x.view(-1, x.shape[-1]), weight)
        return out.view(*x.shape[:-1], weight.shape[-1])
    return nn.functional.linear(x, weight, base.bias)


MERGE_LIMIT_BYTES = 1 << 30  # most memory the merged copies may take


@contextlib.contextmanager
def merged_for_inference(
    layers: Iterable[LoRALinear], limit_bytes: int | None = None
) -> Iterator[int]:
    """Within the block, each enabled float32 adapter runs as one projection: its update folded
    into a copy of the base weight, computed once. Sampling calls every projection once per
    token, and at a few rows a token the adapter's two extra matrix products and its Python
    are a large share of the step (folding gave 1.13-1.32x tokens/s at 64 rows of the bundled
    model, measured A/B on a 2-core CPU). The result equals the unmerged forward to float32
    rounding. Half precision keeps the unmerged forward: rounding the sum to its weights would
    move the sampler off the trainer by more than the precision's rounding of activations.
    Nothing is merged when the copies would exceed `limit_bytes` (default MERGE_LIMIT_BYTES);
    the adapters are unmerged on exit. Yields the number of layers merged. Use under no_grad:
    the copies carry no gradient."""
    chosen = [
        layer
        for layer in layers
        if layer.enabled and layer.base_layer.weight.dtype == torch.float32
    ]
    limit = MERGE_LIMIT_BYTES if limit_bytes is None else limit_bytes
    if sum(layer.base_layer.weight.numel() * 4 for layer in chosen) > limit:
        chosen = []
    try:
        for layer in chosen:
            layer.merged = layer.merged_weight().detach()
        yield len(chosen)
    finally:
        for layer in chosen:
            layer.merged = None


def attach(module: nn.Module, targets, rank: int, scale: float, dropout: float, seed: int) -> dict:
    """Wrap every targeted projection; returns {module path: LoRALinear}."""
    candidates = [name for name, m in module.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    candidates = [n for n in candidates if n != "lm_head" and not n.endswith("score")]
    wrapped = {}
    for path in select_modules(candidates, targets):
        parent_path, _, child = path.rpartition(".")
        parent = module.get_submodule(parent_path)
        layer = LoRALinear(getattr(parent, child), rank, scale, dropout)
        lora_a, lora_b = init_lora_weights(path, layer.in_features, layer.out_features, rank, seed)
        with torch.no_grad():
            layer.lora_A.weight.copy_(torch.from_numpy(lora_a))
            layer.lora_B.weight.copy_(torch.from_numpy(lora_b))
        setattr(parent, child, layer)
        wrapped[path] = layer
    return wrapped


def lora_state(wrapped: dict) -> dict[str, np.ndarray]:
    out = {}
    for path, layer in wrapped.items():
        out[f"{path}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().numpy()
        out[f"{path}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().numpy()
    return out
