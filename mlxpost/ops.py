"""The tiny array namespace that losses and functionals are written in.

Each backend supplies an object with exactly these methods (mlx_backend/ops.py,
torch_backend/ops.py); `NumpyOps` is the reference and runs the same
functionals at the numpy edges (advantages, metrics, tests). Reductions take
`axis`; every method accepts arrays of that backend and Python scalars where
noted.
"""

from __future__ import annotations

import numpy as np

OPS_METHODS = (
    "float32",
    "exp",
    "log",
    "tanh",
    "sigmoid",
    "log_sigmoid",
    "sqrt",
    "abs",
    "square",
    "logsumexp",
    "softmax",
    "log_softmax",
    "take_along_axis",
    "sum",
    "mean",
    "max",
    "minimum",
    "maximum",
    "clip",
    "where",
    "stop_gradient",
    "zeros",
    "concatenate",
    "asarray",
    "to_numpy",
)


class NumpyOps:
    name = "numpy"

    @staticmethod
    def float32(x):
        return np.asarray(x, dtype=np.float32)

    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    tanh = staticmethod(np.tanh)
    sqrt = staticmethod(np.sqrt)
    abs = staticmethod(np.abs)
    square = staticmethod(np.square)
    minimum = staticmethod(np.minimum)
    maximum = staticmethod(np.maximum)
    clip = staticmethod(np.clip)
    where = staticmethod(np.where)

    @staticmethod
    def sigmoid(x):
        return 0.5 * (np.tanh(0.5 * x) + 1.0)

    @staticmethod
    def log_sigmoid(x):
        # log(sigmoid(x)) = -softplus(-x), stable for large |x|.
        return -np.logaddexp(0.0, -x)

    @staticmethod
    def logsumexp(x, axis, keepdims=False):
        top = np.max(x, axis=axis, keepdims=True)
        out = np.log(np.sum(np.exp(x - top), axis=axis, keepdims=True)) + top
        return out if keepdims else np.squeeze(out, axis=axis)

    @classmethod
    def log_softmax(cls, x, axis=-1):
        return x - cls.logsumexp(x, axis=axis, keepdims=True)

    @classmethod
    def softmax(cls, x, axis=-1):
        return np.exp(cls.log_softmax(x, axis=axis))

    @staticmethod
    def take_along_axis(x, indices, axis):
        return np.take_along_axis(x, indices.astype(np.int64), axis=axis)

    @staticmethod
    def sum(x, axis=None, keepdims=False):
        return np.sum(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def mean(x, axis=None, keepdims=False):
        return np.mean(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def max(x, axis=None, keepdims=False):
        return np.max(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def stop_gradient(x):
        return x

    @staticmethod
    def zeros(shape):
        return np.zeros(shape, dtype=np.float32)

    @staticmethod
    def concatenate(xs, axis):
        return np.concatenate(xs, axis=axis)

    @staticmethod
    def asarray(x):
        return np.asarray(x)

    @staticmethod
    def to_numpy(x):
        return np.asarray(x)
