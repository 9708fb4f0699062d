"""The ops namespace (see mlxpost/ops.py) on torch tensors."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class TorchOps:
    name = "torch"

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def float32(x):
        return x.float() if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float32)

    exp = staticmethod(torch.exp)
    log = staticmethod(torch.log)
    tanh = staticmethod(torch.tanh)
    sigmoid = staticmethod(torch.sigmoid)
    log_sigmoid = staticmethod(F.logsigmoid)
    sqrt = staticmethod(torch.sqrt)
    abs = staticmethod(torch.abs)
    square = staticmethod(torch.square)
    where = staticmethod(torch.where)

    @staticmethod
    def minimum(a, b):
        if not isinstance(b, torch.Tensor):
            return torch.clamp(a, max=b)
        if not isinstance(a, torch.Tensor):
            return torch.clamp(b, max=a)
        return torch.minimum(a, b)

    @staticmethod
    def maximum(a, b):
        if not isinstance(b, torch.Tensor):
            return torch.clamp(a, min=b)
        if not isinstance(a, torch.Tensor):
            return torch.clamp(b, min=a)
        return torch.maximum(a, b)

    @staticmethod
    def clip(x, low, high):
        return torch.clamp(x, low, high)

    @staticmethod
    def logsumexp(x, axis, keepdims=False):
        return torch.logsumexp(x, dim=axis, keepdim=keepdims)

    @staticmethod
    def softmax(x, axis=-1):
        return torch.softmax(x, dim=axis)

    @staticmethod
    def log_softmax(x, axis=-1):
        return torch.log_softmax(x, dim=axis)

    @staticmethod
    def take_along_axis(x, indices, axis):
        return torch.take_along_dim(x, indices.long(), dim=axis)

    @staticmethod
    def sum(x, axis=None, keepdims=False):
        if axis is None:
            axis = tuple(range(x.dim()))
        return torch.sum(x, dim=axis, keepdim=keepdims)

    @staticmethod
    def mean(x, axis=None, keepdims=False):
        if axis is None:
            axis = tuple(range(x.dim()))
        return torch.mean(x, dim=axis, keepdim=keepdims)

    @staticmethod
    def max(x, axis=None, keepdims=False):
        if axis is None:
            axis = tuple(range(x.dim()))
        return torch.amax(x, dim=axis, keepdim=keepdims)

    @staticmethod
    def stop_gradient(x):
        return x.detach()

    def zeros(self, shape):
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    @staticmethod
    def concatenate(xs, axis):
        return torch.cat(xs, dim=axis)

    def asarray(self, x):
        if isinstance(x, torch.Tensor):
            return x.to(self.device)
        return torch.as_tensor(np.asarray(x), device=self.device)

    @staticmethod
    def to_numpy(x):
        if isinstance(x, torch.Tensor):
            return x.detach().float().cpu().numpy() if x.is_floating_point() else x.cpu().numpy()
        return np.asarray(x)
