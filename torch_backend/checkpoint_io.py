"""Checkpoint tensors for merging and soups (mlxpost/merge.py), mirroring
mlxpost/mlx_backend/checkpoint_io.py.

Tensors stay torch tensors on the CPU, in the checkpoint's own dtype (numpy has no bfloat16);
only those an update or average touches go through numpy, in float64, so every other tensor
is written back bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file


def open_safetensors(path: str) -> Callable[[str], torch.Tensor]:
    """key -> tensor getter of one safetensors file, reading each tensor on demand."""
    return safe_open(path, framework="pt").get_tensor


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.to(torch.float64).numpy()


def from_numpy(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(array).to(like.dtype)


def is_float(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point()


def save_safetensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    save_file(tensors, path, metadata={"format": "pt"})
