"""LoRA layers on mlxpost's MLX models, mirroring torch_backend/lora.py.

A wrapped projection keeps the original module as `base_layer` and adds
`lora_A` (r, in) and `lora_B` (out, r) linears, so parameter names are PEFT's.
Adapter weights stay float32 whatever the model dtype; the update is computed
in float32 and cast back, as PEFT does. The wrapped layer may be quantized
(nn.QuantizedLinear, QLoRA): it runs as it is, and the update is added to its output.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlxpost.adapters import init_lora_weights, select_modules
from mlxpost.mlx_backend.models.gpt2 import Conv1D


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float):
        super().__init__()
        if isinstance(base_layer, Conv1D):
            in_features, out_features = base_layer.weight.shape  # GPT-2 stores (in, out)
        elif isinstance(base_layer, nn.QuantizedLinear):
            # The weight is packed: 32 / bits values per uint32 column.
            out_features = base_layer.weight.shape[0]
            in_features = base_layer.weight.shape[1] * 32 // base_layer.bits
        elif isinstance(base_layer, nn.Linear):
            out_features, in_features = base_layer.weight.shape
        else:
            raise TypeError(
                "LoRA supports Linear, QuantizedLinear and Conv1D layers, not "
                f"{type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_dropout.train(False)  # on only inside training steps (Backend.dropout_on)
        self.dropout = dropout
        self.scale = scale
        self.enabled = True

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base_layer(x)
        if not self.enabled:
            return y
        h = x.astype(mx.float32)
        if self.dropout > 0:
            h = self.lora_dropout(h)
        update = self.lora_B(self.lora_A(h)) * self.scale
        return y + update.astype(y.dtype)

    def merged_weight(self) -> mx.array:
        """The base weight with the update folded in, in the base layer's layout; a quantized
        base is dequantized first, and the result is float (in its scales' dtype)."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scale  # (out, in)
        weight = self.base_layer.weight
        if isinstance(self.base_layer, nn.QuantizedLinear):
            q = self.base_layer
            weight = mx.dequantize(
                q.weight, q.scales, q.get("biases"), q.group_size, q.bits, mode=q.mode
            )
        if isinstance(self.base_layer, Conv1D):
            delta = delta.T
        return (weight.astype(mx.float32) + delta).astype(weight.dtype)


def projection_paths(module: nn.Module) -> list[str]:
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, (nn.Linear, nn.QuantizedLinear, Conv1D)) and not name.endswith("score")
    ]


def attach(module: nn.Module, targets, rank: int, scale: float, dropout: float, seed: int) -> dict:
    """Wrap every targeted projection; returns {module path: LoRALinear}."""
    wrapped = {}
    for path in select_modules(projection_paths(module), targets):
        parent_path, _, child = path.rpartition(".")
        parent = _submodule(module, parent_path)
        layer = LoRALinear(_child(parent, child), rank, scale, dropout)
        lora_a, lora_b = init_lora_weights(path, layer.in_features, layer.out_features, rank, seed)
        layer.lora_A.weight = mx.array(lora_a)
        layer.lora_B.weight = mx.array(lora_b)
        _set_child(parent, child, layer)
        wrapped[path] = layer
    return wrapped


def replace_module(module: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at `path` (dotted, list indices as numbers) inside `module`."""
    parent_path, _, child = path.rpartition(".")
    _set_child(_submodule(module, parent_path), child, new)


def lora_state(wrapped: dict) -> dict[str, np.ndarray]:
    out = {}
    for path, layer in wrapped.items():
        out[f"{path}.lora_A.weight"] = np.array(layer.lora_A.weight)
        out[f"{path}.lora_B.weight"] = np.array(layer.lora_B.weight)
    return out


def named_parameters(module: nn.Module, trainable_only: bool = False) -> dict[str, mx.array]:
    tree = module.trainable_parameters() if trainable_only else module.parameters()
    return dict(tree_flatten(tree))


# mlx modules keep children in dicts and lists; a path component is a key or an index.
def _child(parent, name: str):
    return parent[int(name)] if isinstance(parent, list) else getattr(parent, name)


def _set_child(parent, name: str, value) -> None:
    if isinstance(parent, list):
        parent[int(name)] = value
    else:
        setattr(parent, name, value)


def _submodule(module: nn.Module, path: str):
    node = module
    for part in path.split(".") if path else []:
        node = _child(node, part)
    return node
