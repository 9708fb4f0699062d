"""Checkpoint tensors for merging and soups (mlxpost/merge.py), mirroring
torch_backend/checkpoint_io.py.

Tensors stay mlx arrays in the checkpoint's own dtype (numpy has no bfloat16); only those an
update or average touches go through numpy, so every other tensor is written back bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np


def open_safetensors(path: str) -> Callable[[str], mx.array]:
    """key -> array getter of one safetensors file."""
    # Not safetensors' mlx loader: it goes through numpy, which has no bfloat16.
    return mx.load(path).__getitem__


def to_numpy(tensor: mx.array) -> np.ndarray:
    # float32 holds bfloat16/float16 exactly; mlx has no float64 on every device.
    return np.array(tensor.astype(mx.float32), dtype=np.float64)


def from_numpy(array: np.ndarray, like: mx.array) -> mx.array:
    return mx.array(array.astype(np.float32)).astype(like.dtype)


def is_float(tensor: mx.array) -> bool:
    return mx.issubdtype(tensor.dtype, mx.floating)


def save_safetensors(tensors: dict[str, mx.array], path: str) -> None:
    mx.save_safetensors(path, tensors, metadata={"format": "pt"})
