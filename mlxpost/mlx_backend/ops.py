"""The ops namespace (see mlxpost/ops.py) on mlx arrays."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np


class MLXOps:
    name = "mlx"

    @staticmethod
    def float32(x):
        return x.astype(mx.float32) if isinstance(x, mx.array) else mx.array(x, dtype=mx.float32)

    exp = staticmethod(mx.exp)
    log = staticmethod(mx.log)
    tanh = staticmethod(mx.tanh)
    sigmoid = staticmethod(mx.sigmoid)
    log_sigmoid = staticmethod(nn.log_sigmoid)
    sqrt = staticmethod(mx.sqrt)
    abs = staticmethod(mx.abs)
    square = staticmethod(mx.square)
    minimum = staticmethod(mx.minimum)
    maximum = staticmethod(mx.maximum)
    clip = staticmethod(mx.clip)
    where = staticmethod(mx.where)
    stop_gradient = staticmethod(mx.stop_gradient)

    @staticmethod
    def logsumexp(x, axis, keepdims=False):
        return mx.logsumexp(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def softmax(x, axis=-1):
        return mx.softmax(x, axis=axis)

    @staticmethod
    def log_softmax(x, axis=-1):
        return x - mx.logsumexp(x, axis=axis, keepdims=True)

    @staticmethod
    def take_along_axis(x, indices, axis):
        return mx.take_along_axis(x, indices.astype(mx.int32), axis=axis)

    @staticmethod
    def sum(x, axis=None, keepdims=False):
        return mx.sum(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def mean(x, axis=None, keepdims=False):
        return mx.mean(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def max(x, axis=None, keepdims=False):
        return mx.max(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def zeros(shape):
        return mx.zeros(shape, dtype=mx.float32)

    @staticmethod
    def concatenate(xs, axis):
        return mx.concatenate(xs, axis=axis)

    @staticmethod
    def asarray(x):
        return x if isinstance(x, mx.array) else mx.array(np.asarray(x))

    @staticmethod
    def to_numpy(x):
        if isinstance(x, mx.array):
            return np.array(x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x)
        return np.asarray(x)
