"""The ops namespace and the shared functionals on every backend, against numpy oracles.

Each backend's ops (numpy always; mlx and torch when installed: a missing backend skips only
its own parameters) runs every method of ``mlxpost.ops.OPS_METHODS`` and every function of
``mlxpost/functional.py``; the results are compared with oracles written here directly from the
math in float64 (explicit loops, naive ``log(sum(exp))``, KL estimators from probability
ratios), never by running the functionals on ``NumpyOps``.  Gradients of the differentiable
functionals (mx.grad, torch autograd) are compared with each other and with central finite
differences of the float64 oracles.

Tolerances are float32 rounding, not a bug budget: |got - ref| <= atol + rtol * |ref| with
rtol = 1e-5 and atol = 1e-6 times the magnitude of the numbers involved (e.g. the largest
|logit / temperature|: the logprob of a token is a difference of numbers that large, each
rounded to float32).  Every comparison prints its max / mean abs difference (run with ``-s``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

import mlxpost.functional as F
from mlxpost.ops import OPS_METHODS, NumpyOps

RTOL = 1e-5
ATOL = 1e-6
BACKENDS = ("numpy", "mlx", "torch")
GRAD_BACKENDS = ("mlx", "torch")


def assert_close(name, ref, got, rtol=RTOL, atol=ATOL):
    """|got - ref| <= atol + rtol * |ref| elementwise; non-finite values must match exactly."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape}, expected {ref.shape}"
    finite = np.isfinite(ref)
    assert np.array_equal(finite, np.isfinite(got)), (
        f"{name}: non-finite values differ: got {got[finite != np.isfinite(got)]}"
    )
    assert np.array_equal(ref[~finite], got[~finite], equal_nan=True), f"{name}: inf/nan differ"
    diff = np.abs(got[finite] - ref[finite])
    max_diff = float(diff.max()) if diff.size else 0.0
    mean_diff = float(diff.mean()) if diff.size else 0.0
    bound = atol + rtol * np.abs(ref[finite])
    within = bool(np.all(diff <= bound))
    used = float(np.max(np.where(diff > 0, diff / np.maximum(bound, 1e-300), 0.0), initial=0.0))
    msg = (
        f"{name}: max abs diff {max_diff:.3e}, mean abs diff {mean_diff:.3e} "
        f"(rtol {rtol:.1e}, atol {atol:.2e}; worst element at {used:.2f}x the tolerance)"
    )
    print(msg)
    assert within, msg


def dtype_name(x) -> str:
    return str(x.dtype).rsplit(".", 1)[-1]


# --------------------------------------------------------------------------- backends


class Backend:
    """One backend's ops plus conversions written here (not through the ops under test)."""

    def __init__(self, name: str):
        self.name = name
        if name == "numpy":
            self.ops = NumpyOps
            self.array_type = np.ndarray
        elif name == "mlx":
            self.mx = pytest.importorskip("mlx.core")
            from mlxpost.mlx_backend.ops import MLXOps

            self.ops = MLXOps
            self.array_type = self.mx.array
        elif name == "torch":
            self.torch = pytest.importorskip("torch")
            from torch_backend.ops import TorchOps

            self.ops = TorchOps(self.torch.device("cpu"))
            self.array_type = self.torch.Tensor
        else:
            raise AssertionError(name)

    def arr(self, x):
        """numpy -> backend array of the same dtype."""
        x = np.asarray(x)
        if self.name == "numpy":
            return x.copy()
        if self.name == "mlx":
            return self.mx.array(x)
        return self.torch.from_numpy(x.copy())

    def np(self, x):
        """backend array -> numpy array."""
        if self.name == "mlx":
            return np.array(x)
        if self.name == "torch":
            return x.detach().cpu().numpy()
        return np.asarray(x)

    def total(self, x):
        if self.name == "mlx":
            return self.mx.sum(x)
        return x.sum()

    def grad(self, fn, args, argnum):
        """d fn(*args) / d args[argnum] for numpy float32 args, as float64 numpy."""
        arrays = [self.arr(a) for a in args]
        if self.name == "mlx":
            return np.array(self.mx.grad(fn, argnums=argnum)(*arrays), dtype=np.float64)
        if self.name == "torch":
            arrays[argnum].requires_grad_(True)
            fn(*arrays).backward()
            return arrays[argnum].grad.double().numpy()
        raise AssertionError("numpy has no autodiff")


@pytest.fixture(params=BACKENDS)
def be(request):
    return Backend(request.param)


@pytest.fixture(params=GRAD_BACKENDS)
def grad_be(request):
    return Backend(request.param)


# --------------------------------------------------------------------------- oracles


def oracle_token_logprobs(logits, input_ids, temperature=1.0):
    logits = np.asarray(logits, dtype=np.float64)
    batch, width, _ = logits.shape
    out = np.zeros((batch, width))
    for b in range(batch):
        for t in range(1, width):
            z = logits[b, t - 1] / temperature
            assert np.abs(z).max() < 700, "naive float64 logsumexp would overflow"
            out[b, t] = z[input_ids[b, t]] - np.log(np.exp(z).sum())
    return out


def oracle_token_entropy(logits, temperature=1.0):
    logits = np.asarray(logits, dtype=np.float64)
    batch, width, _ = logits.shape
    out = np.zeros((batch, width))
    for b in range(batch):
        for t in range(1, width):
            z = logits[b, t - 1] / temperature
            log_z = np.log(np.exp(z).sum())
            p = np.exp(z) / np.exp(z).sum()
            out[b, t] = -np.sum(p * (z - log_z))
    return out


def oracle_masked_sum(values, mask, axis):
    values = np.asarray(values, dtype=np.float64)
    mask = np.asarray(mask, dtype=np.float64)
    if axis is None:
        return sum(v for v, m in zip(values.ravel(), mask.ravel()) if m == 1)
    assert values.ndim == 2 and axis in (1, -1, 0)
    rows = values if axis in (1, -1) else values.T
    masks = mask if axis in (1, -1) else mask.T
    return np.array([sum(v for v, m in zip(r, k) if m == 1) for r, k in zip(rows, masks)])


def oracle_masked_mean(values, mask, axis):
    values = np.asarray(values, dtype=np.float64)
    mask = np.asarray(mask, dtype=np.float64)

    def mean(vs, ms):
        picked = [v for v, m in zip(vs, ms) if m == 1]
        return sum(picked) / len(picked) if picked else 0.0

    if axis is None:
        return mean(values.ravel(), mask.ravel())
    rows = values if axis in (1, -1) else values.T
    masks = mask if axis in (1, -1) else mask.T
    return np.array([mean(r, k) for r, k in zip(rows, masks)])


def oracle_kl(logprobs, ref_logprobs, estimator):
    """Schulman's estimators of KL(p || q) from x ~ p, written with r = q(x) / p(x)."""
    p = np.exp(np.asarray(logprobs, dtype=np.float64))
    q = np.exp(np.asarray(ref_logprobs, dtype=np.float64))
    r = q / p
    if estimator == "k1":
        return -np.log(r)
    if estimator == "k2":
        return 0.5 * np.log(r) ** 2
    if estimator == "k3":
        return (r - 1.0) - np.log(r)
    raise AssertionError(estimator)


def fd_grad(f, args, argnum, h=1e-5):
    """Central finite differences of scalar f(*args) w.r.t. args[argnum], in float64."""
    args = [np.asarray(a, dtype=np.float64) for a in args]
    x = args[argnum]
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[i] += h
        minus[i] -= h
        f_plus = f(*args[:argnum], plus, *args[argnum + 1 :])
        f_minus = f(*args[:argnum], minus, *args[argnum + 1 :])
        grad[i] = (f_plus - f_minus) / (2 * h)
    return grad


# --------------------------------------------------------------------------- data

B, T, V = 3, 6, 11


def make_logits(kind: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        logits = rng.normal(0.0, 2.0, size=(B, T, V))
    elif kind == "large":
        logits = rng.uniform(-80.0, 80.0, size=(B, T, V))
        logits[0, :, 0] = 80.0  # one saturated row: every other token has logprob ~ -160
        logits[0, :, 1:] = -80.0 + rng.uniform(0.0, 1.0, size=(T, V - 1))
        logits[1] += 100.0  # a large common offset must cancel
    else:
        raise AssertionError(kind)
    return logits.astype(np.float32)


def make_ids(seed: int = 1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(B, T))
    ids[0, 1] = 0  # the likeliest token of the saturated row
    ids[0, 2] = 1
    ids[2, -1] = V - 1
    return ids.astype(np.int64)


LOGPROB_CASES = [
    ("normal", 1.0),
    ("normal", 0.7),
    ("normal", 1.6),
    ("large", 1.0),
    ("large", 0.5),
]


def logit_scale(logits, temperature):
    return max(1.0, float(np.abs(np.asarray(logits, np.float64)).max()) / temperature)


# --------------------------------------------------------------------------- ops methods


def _unary_case(method, oracle, low, high, log_uniform=False):
    def case(be, rng):
        if log_uniform:
            x = np.exp(rng.uniform(np.log(low), np.log(high), size=(4, 7)))
        else:
            x = rng.uniform(low, high, size=(4, 7))
            x[0, :3] = [low, high, 0.0 if low <= 0 <= high else low]
            x[1, :4] = [1e-4, -1e-4, 0.5, -0.5] if low < 0 else [1e-4, 2e-4, 0.5, 1.5]
        x = x.astype(np.float32)
        got = getattr(be.ops, method)(be.arr(x))
        assert isinstance(got, be.array_type)
        assert dtype_name(got) == "float32"
        assert_close(f"{be.name} {method}", oracle(x.astype(np.float64)), be.np(got))

    return case


def _log_sigmoid_oracle(x):
    # log(1 / (1 + e^-x)), written so that neither branch overflows.
    return np.where(x >= 0, -np.log1p(np.exp(-np.abs(x))), x - np.log1p(np.exp(-np.abs(x))))


def case_float32(be, rng):
    cases = [
        [1, 2, -3],
        [[0.5, 1.25], [-2.0, 1e-3]],
        np.array([0.1, -7.5, 3e5], dtype=np.float64),
        be.arr(np.array([[1, -2, 3]], dtype=np.int32)),
        be.arr(np.array([0.5, -1.5, 1000.0], dtype=np.float16)),
    ]
    expected = [
        np.array([1.0, 2.0, -3.0]),
        np.array([[0.5, 1.25], [-2.0, 1e-3]]),
        np.array([0.1, -7.5, 3e5]),
        np.array([[1.0, -2.0, 3.0]]),
        np.array([0.5, -1.5, 1000.0]),
    ]
    for i, (x, want) in enumerate(zip(cases, expected)):
        got = be.ops.float32(x)
        assert isinstance(got, be.array_type), f"case {i}: {type(got)}"
        assert dtype_name(got) == "float32", f"case {i}: {got.dtype}"
        assert_close(f"{be.name} float32[{i}]", want.astype(np.float32), be.np(got), 0, 0)


def _axis_cases():
    return [(-1, False), (-1, True), (0, False), (1, True), (1, False)]


def case_logsumexp(be, rng):
    for scale, offset in [(1.0, 0.0), (80.0, 0.0), (30.0, 300.0), (30.0, -300.0)]:
        x = (rng.normal(0.0, scale, size=(3, 4, 6)) + offset).astype(np.float32)
        x64 = x.astype(np.float64)
        for axis, keepdims in _axis_cases():
            got = be.ops.logsumexp(be.arr(x), axis=axis, keepdims=keepdims)
            ref = np.log(np.sum(np.exp(x64), axis=axis, keepdims=keepdims))
            assert dtype_name(got) == "float32"
            atol = ATOL * max(1.0, float(np.abs(x64).max()))
            assert_close(f"{be.name} logsumexp s={scale} o={offset} axis={axis}", ref,
                         be.np(got), atol=atol)  # fmt: skip


def case_softmax(be, rng):
    for scale in (1.0, 80.0):
        x = rng.normal(0.0, scale, size=(3, 4, 6)).astype(np.float32)
        x64 = x.astype(np.float64)
        for axis in (-1, 1, None):
            if axis is None:  # the default axis is the last one
                got, axis = be.ops.softmax(be.arr(x)), -1
            else:
                got = be.ops.softmax(be.arr(x), axis=axis)
            ref = np.exp(x64) / np.exp(x64).sum(axis=axis, keepdims=True)
            assert dtype_name(got) == "float32"
            atol = ATOL * max(1.0, float(np.abs(x64).max()))
            assert_close(f"{be.name} softmax scale={scale} axis={axis}", ref, be.np(got), atol=atol)
            np.testing.assert_allclose(be.np(got).sum(axis=axis), 1.0, rtol=1e-5)


def case_log_softmax(be, rng):
    for scale in (1.0, 80.0):
        x = rng.normal(0.0, scale, size=(3, 4, 6)).astype(np.float32)
        x64 = x.astype(np.float64)
        for axis in (-1, 1, None):
            if axis is None:
                got, axis = be.ops.log_softmax(be.arr(x)), -1
            else:
                got = be.ops.log_softmax(be.arr(x), axis=axis)
            ref = x64 - np.log(np.exp(x64).sum(axis=axis, keepdims=True))
            assert dtype_name(got) == "float32"
            atol = ATOL * max(1.0, float(np.abs(x64).max()))
            assert_close(f"{be.name} log_softmax scale={scale} axis={axis}", ref, be.np(got),
                         atol=atol)  # fmt: skip


def case_take_along_axis(be, rng):
    x = rng.normal(size=(2, 3, 5)).astype(np.float32)
    for index_dtype in (np.int64, np.int32):
        idx = rng.integers(0, 5, size=(2, 3, 2)).astype(index_dtype)
        got = be.np(be.ops.take_along_axis(be.arr(x), be.arr(idx), axis=-1))
        ref = np.zeros(idx.shape)
        for i, j, k in np.ndindex(idx.shape):
            ref[i, j, k] = x[i, j, idx[i, j, k]]
        assert_close(f"{be.name} take_along_axis -1 {index_dtype.__name__}", ref, got, 0, 0)
        idx = rng.integers(0, 3, size=(2, 1, 5)).astype(index_dtype)
        got = be.np(be.ops.take_along_axis(be.arr(x), be.arr(idx), axis=1))
        ref = np.zeros(idx.shape)
        for i, j, k in np.ndindex(idx.shape):
            ref[i, j, k] = x[i, idx[i, j, k], k]
        assert_close(f"{be.name} take_along_axis 1 {index_dtype.__name__}", ref, got, 0, 0)


def _reduction_case(method):
    def loop_reduce(x, axis, keepdims):
        if axis is None:
            flat = list(x.ravel())
            return {"sum": sum(flat), "mean": sum(flat) / len(flat), "max": max(flat)}[method]
        moved = np.moveaxis(x, axis, -1)
        out = np.zeros(moved.shape[:-1])
        for i in np.ndindex(out.shape):
            out[i] = loop_reduce(moved[i], None, False)
        return np.expand_dims(out, axis) if keepdims else out

    def case(be, rng):
        x = (rng.normal(0.0, 10.0, size=(3, 4, 5))).astype(np.float32)
        x64 = x.astype(np.float64)
        fn = getattr(be.ops, method)
        got = fn(be.arr(x))
        assert_close(f"{be.name} {method} all", loop_reduce(x64, None, False), be.np(got),
                     atol=ATOL * 60)  # fmt: skip
        for axis, keepdims in [(0, False), (1, True), (-1, False), (-1, True), (2, True)]:
            got = fn(be.arr(x), axis=axis, keepdims=keepdims)
            assert dtype_name(got) == "float32"
            assert_close(f"{be.name} {method} axis={axis} keepdims={keepdims}",
                         loop_reduce(x64, axis, keepdims), be.np(got), atol=ATOL * 60)  # fmt: skip

    return case


def _binary_extreme_case(method):
    pick = min if method == "minimum" else max

    def case(be, rng):
        a = rng.normal(size=(3, 4)).astype(np.float32)
        b = rng.normal(size=(3, 4)).astype(np.float32)
        b[0] = a[0]  # ties
        fn = getattr(be.ops, method)
        checks = {
            "array/array": (fn(be.arr(a), be.arr(b)), np.vectorize(pick)(a, b)),
            "array/scalar": (fn(be.arr(a), 0.25), np.vectorize(pick)(a, 0.25)),
            "scalar/array": (fn(0.25, be.arr(a)), np.vectorize(pick)(0.25, a)),
            "array/int scalar": (fn(be.arr(a), 1), np.vectorize(pick)(a, 1.0)),
        }
        for what, (got, ref) in checks.items():
            assert dtype_name(got) == "float32", f"{what}: {got.dtype}"
            assert_close(f"{be.name} {method} {what}", ref, be.np(got), 0, 0)

    return case


def case_clip(be, rng):
    x = rng.normal(0.0, 2.0, size=(4, 5)).astype(np.float32)
    for low, high in [(-1.0, 1.0), (0.8, 1.2), (0, 3)]:
        got = be.ops.clip(be.arr(x), low, high)
        ref = np.array([[min(max(v, low), high) for v in row] for row in x.astype(np.float64)])
        ref = ref.astype(np.float32)  # the bounds are rounded to float32 like the values
        assert dtype_name(got) == "float32"
        assert_close(f"{be.name} clip [{low}, {high}]", ref, be.np(got), 0, 0)


def case_where(be, rng):
    x = rng.normal(size=(3, 4)).astype(np.float32)
    y = rng.normal(size=(3, 4)).astype(np.float32)
    cond = x > y
    ref = np.array([[xv if c else yv for xv, yv, c in zip(*r)] for r in zip(x, y, cond)])
    got = be.ops.where(be.arr(cond), be.arr(x), be.arr(y))
    assert_close(f"{be.name} where arrays", ref, be.np(got), 0, 0)
    ref = np.array([[xv if c else 0.0 for xv, c in zip(*r)] for r in zip(x, cond)])
    got = be.ops.where(be.arr(cond), be.arr(x), 0.0)
    assert dtype_name(got) == "float32"
    assert_close(f"{be.name} where scalar", ref, be.np(got), 0, 0)


def case_stop_gradient(be, rng):
    x = rng.normal(size=(3, 4)).astype(np.float32)
    got = be.ops.stop_gradient(be.arr(x))
    assert isinstance(got, be.array_type)
    assert_close(f"{be.name} stop_gradient value", x, be.np(got), 0, 0)


def case_zeros(be, rng):
    for shape in [(2, 3), (4, 1), (5,)]:
        got = be.ops.zeros(shape)
        assert isinstance(got, be.array_type)
        assert dtype_name(got) == "float32"
        assert tuple(got.shape) == shape
        assert not np.any(be.np(got))


def _concatenate_oracle(parts, axis):
    axis = axis % parts[0].ndim
    sizes = [p.shape[axis] for p in parts]
    shape = list(parts[0].shape)
    shape[axis] = sum(sizes)
    out = np.zeros(shape)
    for idx in np.ndindex(*shape):
        j, k = idx[axis], 0
        while j >= sizes[k]:
            j, k = j - sizes[k], k + 1
        src = list(idx)
        src[axis] = j
        out[idx] = parts[k][tuple(src)]
    return out


def case_concatenate(be, rng):
    for axis in (0, 1, 2, -1):
        parts = []
        for n in (1, 3, 2):
            shape = [2, 3, 4]
            shape[axis] = n
            parts.append(rng.normal(size=shape).astype(np.float32))
        got = be.ops.concatenate([be.arr(p) for p in parts], axis=axis)
        assert dtype_name(got) == "float32"
        ref = _concatenate_oracle(parts, axis)
        assert_close(f"{be.name} concatenate axis={axis}", ref, be.np(got), 0, 0)


def case_asarray(be, rng):
    x = rng.normal(size=(2, 3)).astype(np.float32)
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    got = be.ops.asarray(x)
    assert isinstance(got, be.array_type)
    assert dtype_name(got) == "float32"
    assert_close(f"{be.name} asarray float", x, be.np(got), 0, 0)
    got = be.ops.asarray(ids)
    assert isinstance(got, be.array_type)
    assert "int" in dtype_name(got)
    assert np.array_equal(be.np(got), ids)
    native = be.arr(x)
    got = be.ops.asarray(native)
    assert isinstance(got, be.array_type)
    assert_close(f"{be.name} asarray native", x, be.np(got), 0, 0)


def case_to_numpy(be, rng):
    x = rng.normal(size=(2, 3)).astype(np.float32)
    got = be.ops.to_numpy(be.arr(x))
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    assert_close(f"{be.name} to_numpy float", x, got, 0, 0)
    ids = np.array([[4, 0, 7]], dtype=np.int32)
    got = be.ops.to_numpy(be.arr(ids))
    assert isinstance(got, np.ndarray) and np.issubdtype(got.dtype, np.integer)
    assert np.array_equal(got, ids)
    # bfloat16 (not a numpy dtype) comes back as float32; these values are exact in bfloat16.
    exact = np.array([1.5, -2.25, 0.0078125, 3.0, -96.0], dtype=np.float32)
    if be.name == "mlx":
        low = be.arr(exact).astype(be.mx.bfloat16)
    elif be.name == "torch":
        low = be.arr(exact).to(be.torch.bfloat16)
    else:
        low = exact.astype(np.float16)
    got = be.ops.to_numpy(low)
    assert isinstance(got, np.ndarray) and np.issubdtype(got.dtype, np.floating)
    assert_close(f"{be.name} to_numpy low precision", exact, got, 0, 0)


OPS_CASES: dict[str, Callable] = {
    "float32": case_float32,
    "exp": _unary_case("exp", np.exp, -80.0, 80.0),
    "log": _unary_case("log", np.log, 1e-30, 1e30, log_uniform=True),
    "tanh": _unary_case("tanh", np.tanh, -20.0, 20.0),
    "sigmoid": _unary_case("sigmoid", lambda x: 1.0 / (1.0 + np.exp(-x)), -200.0, 200.0),
    "log_sigmoid": _unary_case("log_sigmoid", _log_sigmoid_oracle, -200.0, 200.0),
    "sqrt": _unary_case("sqrt", np.sqrt, 0.0, 1e4),
    "abs": _unary_case("abs", lambda x: np.where(x < 0, -x, x), -100.0, 100.0),
    "square": _unary_case("square", lambda x: x * x, -100.0, 100.0),
    "logsumexp": case_logsumexp,
    "softmax": case_softmax,
    "log_softmax": case_log_softmax,
    "take_along_axis": case_take_along_axis,
    "sum": _reduction_case("sum"),
    "mean": _reduction_case("mean"),
    "max": _reduction_case("max"),
    "minimum": _binary_extreme_case("minimum"),
    "maximum": _binary_extreme_case("maximum"),
    "clip": case_clip,
    "where": case_where,
    "stop_gradient": case_stop_gradient,
    "zeros": case_zeros,
    "concatenate": case_concatenate,
    "asarray": case_asarray,
    "to_numpy": case_to_numpy,
}


def test_every_ops_method_has_a_case():
    assert set(OPS_CASES) == set(OPS_METHODS)


def test_backend_ops_provide_every_method(be):
    missing = [m for m in OPS_METHODS if not callable(getattr(be.ops, m, None))]
    assert not missing, f"{be.name} ops lacks {missing}"
    assert be.ops.name == be.name


@pytest.mark.parametrize("method", OPS_METHODS)
def test_ops_method(be, method):
    OPS_CASES[method](be, np.random.default_rng(OPS_METHODS.index(method)))


@pytest.mark.parametrize("backend_name", ["numpy", "mlx", "torch"])
@pytest.mark.parametrize("method", ["sum", "mean", "max"])
def test_reduction_keepdims_without_axis(backend_name, method):
    be = Backend(backend_name)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    got = getattr(be.ops, method)(be.arr(x), axis=None, keepdims=True)
    ref = {"sum": 15.0, "mean": 2.5, "max": 5.0}[method]
    assert tuple(got.shape) == (1, 1)
    assert_close(f"{be.name} {method} keepdims", [[ref]], be.np(got), 0, 0)


# --------------------------------------------------------------------------- functionals


COVERED_FUNCTIONALS = {
    "token_logprobs",
    "token_entropy",
    "token_kl",
    "token_jsd",
    "masked_sum",
    "masked_mean",
    "kl_estimate",
    "last_token_index",
    "prediction_mask",
    "nll_loss",
    "head_terms",
}


def test_every_functional_is_covered():
    public = {
        name
        for name, fn in inspect.getmembers(F, inspect.isfunction)
        if fn.__module__ == F.__name__ and not name.startswith("_")
    }
    missing = public - COVERED_FUNCTIONALS
    assert not missing, f"functionals without a parity test: {sorted(missing)}"


@pytest.mark.parametrize("kind,temperature", LOGPROB_CASES)
def test_token_logprobs(be, kind, temperature):
    logits, ids = make_logits(kind), make_ids()
    got = F.token_logprobs(be.ops, be.arr(logits), be.arr(ids), temperature=temperature)
    assert isinstance(got, be.array_type)
    assert dtype_name(got) == "float32"
    got = be.np(got)
    assert np.all(got[:, 0] == 0.0), "column 0 has no prediction and must be exactly 0"
    assert np.all(got <= 1e-6), "log-probabilities are <= 0"
    ref = oracle_token_logprobs(logits, ids, temperature)
    atol = ATOL * logit_scale(logits, temperature)
    assert_close(f"{be.name} token_logprobs {kind} T={temperature}", ref, got, atol=atol)


def test_token_logprobs_upcasts_low_precision_logits_before_temperature(be):
    # Low-precision logits are upcast before the temperature divides them.
    logits = (make_logits("normal") * 8).astype(np.float16)
    ids = make_ids()
    if be.name == "torch":
        arr = be.arr(logits.astype(np.float32)).to(be.torch.bfloat16)
        exact = arr.float().numpy()
    elif be.name == "mlx":
        arr = be.arr(logits.astype(np.float32)).astype(be.mx.bfloat16)
        exact = np.array(arr.astype(be.mx.float32))
    else:
        arr, exact = logits, logits.astype(np.float32)
    got = F.token_logprobs(be.ops, arr, be.arr(ids), temperature=1.3)
    assert dtype_name(got) == "float32"
    atol = ATOL * logit_scale(exact, 1.3)
    ref = oracle_token_logprobs(exact, ids, 1.3)
    assert_close(f"{be.name} token_logprobs low precision", ref, be.np(got), atol=atol)


def test_token_logprobs_row_sums_to_one():
    # Oracle sanity: summing exp(logprob) over every possible token at a position gives 1.
    logits = make_logits("normal")
    total = np.zeros((B, T - 1))
    for v in range(V):
        ids = np.full((B, T), v)
        total += np.exp(oracle_token_logprobs(logits, ids, 0.7)[:, 1:])
    np.testing.assert_allclose(total, 1.0, rtol=1e-12)


@pytest.mark.parametrize("kind,temperature", LOGPROB_CASES)
def test_token_entropy(be, kind, temperature):
    logits = make_logits(kind)
    got = F.token_entropy(be.ops, be.arr(logits), temperature=temperature)
    assert isinstance(got, be.array_type)
    assert dtype_name(got) == "float32"
    got = be.np(got)
    assert np.all(got[:, 0] == 0.0)
    assert np.all(got >= -1e-5) and np.all(got <= np.log(V) + 1e-5), "0 <= H <= log V"
    ref = oracle_token_entropy(logits, temperature)
    atol = ATOL * logit_scale(logits, temperature)
    assert_close(f"{be.name} token_entropy {kind} T={temperature}", ref, got, atol=atol)


def oracle_token_kl(logits, other, temperature):
    """sum_v p_v (log p_v - log q_v) per position, in float64 loops over rows."""
    batch, length, _ = logits.shape
    out = np.zeros((batch, length))
    for b in range(batch):
        for t in range(1, length):
            z_p = logits[b, t - 1].astype(np.float64) / temperature
            z_q = other[b, t - 1].astype(np.float64) / temperature
            log_p = z_p - np.log(np.sum(np.exp(z_p - z_p.max()))) - z_p.max()
            log_q = z_q - np.log(np.sum(np.exp(z_q - z_q.max()))) - z_q.max()
            out[b, t] = np.sum(np.exp(log_p) * (log_p - log_q))
    return out


@pytest.mark.parametrize("kind,temperature", LOGPROB_CASES)
def test_token_kl(be, kind, temperature):
    logits = make_logits(kind)
    other = (logits + np.random.default_rng(9).normal(0, 2.0, size=logits.shape)).astype(np.float32)
    got = be.np(F.token_kl(be.ops, be.arr(logits), be.arr(other), temperature=temperature))
    assert np.all(got[:, 0] == 0.0) and np.all(got >= -1e-5), "KL is non-negative"
    ref = oracle_token_kl(logits, other, temperature)
    atol = ATOL * logit_scale(logits, temperature)
    assert_close(f"{be.name} token_kl {kind} T={temperature}", ref, got, atol=atol)
    same = be.np(F.token_kl(be.ops, be.arr(logits), be.arr(logits), temperature=temperature))
    assert_close(f"{be.name} token_kl of a model with itself", np.zeros_like(ref), same, atol=atol)


def oracle_token_jsd(student, teacher, beta, temperature):
    """beta KL(P||M) + (1-beta) KL(Q||M) from probabilities, float64 loops."""
    batch, length, _ = student.shape
    out = np.zeros((batch, length))
    for b in range(batch):
        for t in range(1, length):
            z_q = student[b, t - 1].astype(np.float64) / temperature
            z_p = teacher[b, t - 1].astype(np.float64) / temperature
            q = np.exp(z_q - z_q.max()) / np.exp(z_q - z_q.max()).sum()
            p = np.exp(z_p - z_p.max()) / np.exp(z_p - z_p.max()).sum()
            m = beta * p + (1 - beta) * q
            kl_pm = np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(m)), 0.0))
            kl_qm = np.sum(np.where(q > 0, q * (np.log(np.where(q > 0, q, 1)) - np.log(m)), 0.0))
            out[b, t] = beta * kl_pm + (1 - beta) * kl_qm
    return out


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_token_jsd(be, beta):
    student = make_logits("normal")
    teacher = (student + np.random.default_rng(10).normal(0, 3.0, size=student.shape)).astype(
        np.float32
    )
    got = be.np(F.token_jsd(be.ops, be.arr(student), be.arr(teacher), beta=beta, temperature=0.7))
    ref = oracle_token_jsd(student, teacher, beta, 0.7)
    assert np.all(got[:, 0] == 0.0) and np.all(got >= -1e-5)
    assert np.all(ref <= -(beta * np.log(beta) + (1 - beta) * np.log(1 - beta)) + 1e-9), (
        "JSD <= H(beta)"
    )
    assert_close(
        f"{be.name} token_jsd beta={beta}", ref, got, atol=ATOL * logit_scale(student, 0.7)
    )


HEAD_CASES = [  # (chunk rows, temperature, divergence, divergence temperature)
    (None, 1.0, "kl", None),
    (4, 0.7, "kl", None),  # 15 rows: chunks of 4, 4, 4, 3 that straddle rows
    (1, 1.3, "kl_from_other", 2.0),
    (7, 1.0, "jsd", 0.5),
]


@pytest.mark.parametrize("chunk, temperature, divergence, div_temperature", HEAD_CASES)
def test_head_terms_match_the_token_functionals(
    be, chunk, temperature, divergence, div_temperature
):
    """head_terms over given logits, whole or in chunks of rows, gives the oracles' logprobs,
    entropy and divergence against another model's logits."""
    logits, ids = make_logits("normal"), make_ids()
    other = (logits + np.random.default_rng(11).normal(0, 2.0, size=logits.shape)).astype(
        np.float32
    )
    forward = F.LogitsForward(
        be.ops, be.arr(logits), frozen={"teacher": be.arr(other)}, chunk=chunk
    )
    terms = F.head_terms(
        be.ops,
        forward,
        be.arr(ids),
        be.arr(np.ones((B, T), np.float32)),
        temperature=temperature,
        entropy=True,
        other="teacher",
        divergence=divergence,
        beta=0.3,
        divergence_temperature=div_temperature,
    )
    assert set(terms) == {"logprobs", "entropy", "divergence"}
    atol = ATOL * logit_scale(logits, min(temperature, div_temperature or temperature))
    t_div = div_temperature or temperature
    expected_div = {
        "kl": lambda: oracle_token_kl(logits, other, t_div),
        "kl_from_other": lambda: oracle_token_kl(other, logits, t_div),
        "jsd": lambda: oracle_token_jsd(logits, other, 0.3, t_div),
    }[divergence]()
    for name, ref in (
        ("logprobs", oracle_token_logprobs(logits, ids, temperature)),
        ("entropy", oracle_token_entropy(logits, temperature)),
        ("divergence", expected_div),
    ):
        assert tuple(terms[name].shape) == (B, T)
        assert_close(
            f"{be.name} head_terms {name} chunk={chunk}", ref, be.np(terms[name]), atol=atol
        )


def test_head_terms_rejects_an_unknown_divergence():
    logits, ids = make_logits("normal"), make_ids()
    forward = F.LogitsForward(NumpyOps, logits, frozen={"reference": logits})
    with pytest.raises(ValueError, match="unknown divergence"):
        F.head_terms(NumpyOps, forward, ids, np.ones_like(ids), other="reference", divergence="l2")


def test_token_jsd_rejects_bad_beta():
    logits = make_logits("normal")
    for beta in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="mixing coefficient"):
            F.token_jsd(NumpyOps, logits, logits, beta=beta)


def test_token_entropy_limits(be):
    # Uniform logits: log V; one dominant logit: ~0.
    uniform = np.full((2, 3, V), 4.0, dtype=np.float32)
    got = be.np(F.token_entropy(be.ops, be.arr(uniform)))
    assert_close(f"{be.name} entropy uniform", [[0.0, np.log(V), np.log(V)]] * 2, got)
    peaked = np.full((1, 2, V), -80.0, dtype=np.float32)
    peaked[..., 3] = 80.0
    got = be.np(F.token_entropy(be.ops, be.arr(peaked)))
    assert_close(f"{be.name} entropy peaked", [[0.0, 0.0]], got)


def _masks():
    rng = np.random.default_rng(3)
    mask = (rng.uniform(size=(4, 7)) < 0.6).astype(np.float32)
    mask[1] = 0.0  # an all-zero row
    mask[2] = 1.0
    mask[3] = 0.0
    mask[3, 4] = 1.0  # a single token
    return mask


@pytest.mark.parametrize("mask_dtype", ["float32", "int32", "bool"])
@pytest.mark.parametrize("axis", [None, 1, -1, 0])
def test_masked_sum_and_mean(be, axis, mask_dtype):
    rng = np.random.default_rng(4)
    values = rng.normal(0.0, 5.0, size=(4, 7)).astype(np.float32)
    mask = _masks().astype(mask_dtype)
    for fn, oracle in [(F.masked_sum, oracle_masked_sum), (F.masked_mean, oracle_masked_mean)]:
        got = fn(be.ops, be.arr(values), be.arr(mask), axis=axis)
        assert dtype_name(got) == "float32", f"{fn.__name__}: {got.dtype}"
        got = be.np(got)
        ref = oracle(values, mask, axis)
        name = f"{be.name} {fn.__name__} axis={axis} mask={mask_dtype}"
        assert_close(name, ref, got, atol=ATOL * 40)
    if axis in (1, -1):
        assert got[1] == 0.0, "an all-zero mask row has mean 0, not NaN"


@pytest.mark.parametrize("backend_name", ["numpy", "mlx", "torch"])
@pytest.mark.parametrize("mask_dtype", ["int32", "bool"])
def test_masked_mean_dtype_with_integer_mask(backend_name, mask_dtype):
    # prediction_mask returns an int32 mask; float32 values must stay float32 on every backend.
    be = Backend(backend_name)
    values = np.ones((2, 3), dtype=np.float32)
    mask = _masks()[:2, :3].astype(mask_dtype)
    for fn in (F.masked_sum, F.masked_mean):
        got = fn(be.ops, be.arr(values), be.arr(mask), axis=1)
        assert dtype_name(got) == "float32", f"{fn.__name__}: {got.dtype}"


@pytest.mark.parametrize("mask_dtype", ["float32", "int32"])
def test_masked_mean_all_zero_mask_is_zero(be, mask_dtype):
    values = np.full((2, 3), 7.0, dtype=np.float32)
    mask = np.zeros((2, 3), dtype=mask_dtype)
    got = be.np(F.masked_mean(be.ops, be.arr(values), be.arr(mask)))
    assert got.shape == () and got == 0.0, got
    got = be.np(F.masked_mean(be.ops, be.arr(values), be.arr(mask), axis=1))
    assert np.array_equal(got, [0.0, 0.0]), got
    assert be.np(F.masked_sum(be.ops, be.arr(values), be.arr(mask))) == 0.0


def _kl_inputs():
    rng = np.random.default_rng(5)
    logprobs = rng.uniform(-12.0, -0.01, size=(3, 8)).astype(np.float32)
    ref_logprobs = (logprobs + rng.normal(0.0, 1.5, size=(3, 8))).clip(-14, -1e-3)
    ref_logprobs[0, :3] = logprobs[0, :3]  # identical policy: every estimator is 0
    return logprobs, ref_logprobs.astype(np.float32)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimate(be, estimator):
    logprobs, ref_logprobs = _kl_inputs()
    got = F.kl_estimate(be.ops, be.arr(logprobs), be.arr(ref_logprobs), estimator=estimator)
    assert dtype_name(got) == "float32"
    got = be.np(got)
    ref = oracle_kl(logprobs, ref_logprobs, estimator)
    # log r is a float32 difference of numbers up to 14; exp(-log r) amplifies its error.
    assert_close(f"{be.name} kl {estimator}", ref, got, atol=ATOL * 14)
    assert np.all(got[0, :3] == 0.0)
    if estimator != "k1":
        assert np.all(got >= 0.0), f"{estimator} is non-negative"


def test_kl_estimate_default_is_k3(be):
    logprobs, ref_logprobs = _kl_inputs()
    got = be.np(F.kl_estimate(be.ops, be.arr(logprobs), be.arr(ref_logprobs)))
    assert_close(f"{be.name} kl default", oracle_kl(logprobs, ref_logprobs, "k3"), got,
                 atol=ATOL * 14)  # fmt: skip


@pytest.mark.parametrize("estimator", ["k4", "K3", "", "kl", None])
def test_kl_estimate_unknown_estimator(be, estimator):
    logprobs, ref_logprobs = _kl_inputs()
    with pytest.raises(ValueError, match="estimator"):
        F.kl_estimate(be.ops, be.arr(logprobs), be.arr(ref_logprobs), estimator=estimator)


def test_kl_estimators_are_unbiased_for_kl_policy_to_reference(be):
    # E_{x~p}[k1] = E_{x~p}[k3] = KL(p || q); a swapped direction or sign is far off.
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    q = np.array([0.1, 0.3, 0.3, 0.2, 0.1])
    exact = float(np.sum(p * np.log(p / q)))
    reverse = float(np.sum(q * np.log(q / p)))
    samples = np.random.default_rng(6).choice(len(p), size=200_000, p=p)
    logprobs = np.log(p)[samples].astype(np.float32)[None]
    ref_logprobs = np.log(q)[samples].astype(np.float32)[None]
    for estimator in ("k1", "k3"):
        k = be.np(F.kl_estimate(be.ops, be.arr(logprobs), be.arr(ref_logprobs), estimator))
        k = k.astype(np.float64)
        stderr = k.std() / np.sqrt(k.size)
        print(f"{be.name} {estimator}: mean {k.mean():.4f}, KL {exact:.4f}, stderr {stderr:.1e}")
        assert abs(k.mean() - exact) < 5 * stderr, (estimator, k.mean(), exact)
        assert abs(k.mean() - reverse) > 20 * stderr


def _left_right_masks():
    return np.array(
        [
            [1, 1, 1, 1, 0, 0],  # right padding
            [0, 0, 1, 1, 1, 1],  # left padding
            [1, 1, 1, 1, 1, 1],  # full
            [0, 0, 0, 1, 0, 0],  # a single token
            [1, 0, 0, 0, 0, 0],  # a single token at column 0
            [0, 1, 1, 1, 1, 0],  # both
        ]
    )


def test_prediction_mask():
    mask = _left_right_masks()
    ref = np.zeros_like(mask)
    for b, t in np.ndindex(mask.shape):
        ref[b, t] = int(t > 0 and mask[b, t] == 1 and mask[b, t - 1] == 1)
    for variant in (mask, mask.astype(bool), mask.astype(np.float32), mask.tolist()):
        got = F.prediction_mask(variant)
        assert isinstance(got, np.ndarray) and np.issubdtype(got.dtype, np.integer)
        assert np.array_equal(got, ref), (got, ref)
    # Exactly one token per contiguous run (its first) loses its prediction.
    assert np.array_equal(mask.sum(1) - got.sum(1), [1, 1, 1, 1, 1, 1])


def test_prediction_mask_does_not_modify_input():
    mask = _left_right_masks().astype(np.int32)
    before = mask.copy()
    F.prediction_mask(mask)
    assert np.array_equal(mask, before)


def test_last_token_index():
    mask = _left_right_masks()
    ref = [max(t for t in range(mask.shape[1]) if row[t] == 1) for row in mask]
    got = F.last_token_index(mask)
    assert np.array_equal(got, ref), (got, ref)
    assert np.array_equal(F.last_token_index(mask.astype(bool)), ref)
    assert np.array_equal(F.last_token_index(mask.tolist()), ref)
    with pytest.raises(ValueError, match="no tokens"):
        F.last_token_index(np.array([[1, 1, 0], [0, 0, 0]]))


class FakeForward(F.LogitsForward):
    """Given logits, recording the calls that ask for them; in chunks of 4 rows."""

    def __init__(self, ops, logits):
        super().__init__(ops, logits, chunk=4)
        self.calls = []

    def hidden(self, input_ids, attention_mask):
        self.calls.append((input_ids, attention_mask))
        return super().hidden(input_ids, attention_mask)


def _nll_batch(be, ids):
    attention = np.ones((B, T), dtype=np.float32)
    attention[2, -2:] = 0.0
    loss_mask = attention.copy()
    loss_mask[:, :2] = 0.0  # prompt
    return {
        "input_ids": be.arr(ids),
        "attention_mask": be.arr(attention),
        "loss_mask": be.arr(loss_mask),
    }, loss_mask


def oracle_nll(logits, ids, loss_mask):
    lp = oracle_token_logprobs(logits, ids)
    picked = [lp[b, t] for b, t in np.ndindex(lp.shape) if loss_mask[b, t] == 1]
    return -sum(picked) / len(picked)


@pytest.mark.parametrize("kind", ["normal", "large"])
def test_nll_loss(be, kind):
    logits, ids = make_logits(kind), make_ids()
    batch, loss_mask = _nll_batch(be, ids)
    forward = FakeForward(be.ops, be.arr(logits))
    loss, metrics = F.nll_loss(be.ops, forward, batch)
    assert len(forward.calls) == 1 and forward.calls[0][1] is batch["attention_mask"]
    assert set(metrics) == {"nll"}
    ref = oracle_nll(logits, ids, loss_mask)
    atol = ATOL * logit_scale(logits, 1.0)
    assert_close(f"{be.name} nll_loss {kind}", ref, be.np(loss), atol=atol)
    assert_close(f"{be.name} nll metric {kind}", ref, be.np(metrics["nll"]), atol=atol)


def test_nll_loss_with_no_loss_tokens_is_zero(be):
    logits, ids = make_logits("normal"), make_ids()
    batch, _ = _nll_batch(be, ids)
    batch["loss_mask"] = be.arr(np.zeros((B, T), dtype=np.float32))
    loss, _ = F.nll_loss(be.ops, FakeForward(be.ops, be.arr(logits)), batch)
    assert be.np(loss) == 0.0


# --------------------------------------------------------------------------- gradients


@dataclass
class GradCase:
    fn: Callable  # backend arrays -> backend scalar
    args: list  # numpy float32 arrays
    argnum: int
    oracle: Callable  # float64 numpy arrays -> float
    atol: float


def _weights(shape, seed=7):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def grad_logprobs(be, kind, temperature):
    logits, ids = make_logits(kind), make_ids()
    w = _weights((B, T))
    ids_b, w_b = be.arr(ids), be.arr(w)

    def fn(x):
        return be.total(w_b * F.token_logprobs(be.ops, x, ids_b, temperature=temperature))

    def oracle(x):
        return float(np.sum(w * oracle_token_logprobs(x, ids, temperature)))

    return GradCase(fn, [logits], 0, oracle, ATOL * logit_scale(logits, temperature))


def grad_entropy(be, kind, temperature):
    logits = make_logits(kind)
    w = _weights((B, T))
    w_b = be.arr(w)

    def fn(x):
        return be.total(w_b * F.token_entropy(be.ops, x, temperature=temperature))

    def oracle(x):
        return float(np.sum(w * oracle_token_entropy(x, temperature)))

    return GradCase(fn, [logits], 0, oracle, ATOL * logit_scale(logits, temperature))


def grad_head_terms(be, chunk):
    """Weighted logprobs plus KL to a fixed model, through head_terms in chunks of rows."""
    logits, ids = make_logits("normal"), make_ids()
    other = (logits + np.random.default_rng(12).normal(0, 1.0, size=logits.shape)).astype(
        np.float32
    )
    w = _weights((B, T))
    w_b, ids_b, other_b = be.arr(w), be.arr(ids), be.arr(other)
    mask_b = be.arr(np.ones((B, T), np.float32))

    def fn(x):
        forward = F.LogitsForward(be.ops, x, frozen={"reference": other_b}, chunk=chunk)
        terms = F.head_terms(be.ops, forward, ids_b, mask_b, temperature=0.8, other="reference")
        return be.total(w_b * (terms["logprobs"] + terms["divergence"]))

    def oracle(x):
        lp = oracle_token_logprobs(x, ids, 0.8)
        return float(np.sum(w * (lp + oracle_token_kl(x, other, 0.8))))

    return GradCase(fn, [logits], 0, oracle, ATOL * logit_scale(logits, 0.8))


def grad_masked_mean(be, axis):
    values = np.random.default_rng(8).normal(0.0, 3.0, size=(4, 7)).astype(np.float32)
    mask = _masks()
    w = _weights((4,)) if axis == 1 else np.float32(1.7)
    mask_b, w_b = be.arr(mask), be.arr(w)

    def fn(v):
        return be.total(w_b * F.masked_mean(be.ops, v, mask_b, axis=axis))

    def oracle(v):
        return float(np.sum(w * oracle_masked_mean(v, mask, axis)))

    return GradCase(fn, [values], 0, oracle, ATOL)


def grad_kl(be, estimator, argnum):
    logprobs, ref_logprobs = _kl_inputs()
    w = _weights(logprobs.shape)
    w_b = be.arr(w)

    def fn(lp, ref):
        return be.total(w_b * F.kl_estimate(be.ops, lp, ref, estimator=estimator))

    def oracle(lp, ref):
        return float(np.sum(w * oracle_kl(lp, ref, estimator)))

    # d k3 / d logprobs = 1 - exp(-log r): up to e^14 here, rounded to float32.
    return GradCase(fn, [logprobs, ref_logprobs], argnum, oracle, ATOL * 14)


def grad_nll(be, kind):
    logits, ids = make_logits(kind), make_ids()
    batch, loss_mask = _nll_batch(be, ids)

    def fn(x):
        return F.nll_loss(be.ops, FakeForward(be.ops, x), batch)[0]

    def oracle(x):
        return oracle_nll(x, ids, loss_mask)

    return GradCase(fn, [logits], 0, oracle, ATOL * logit_scale(logits, 1.0))


GRAD_CASES = {
    **{
        f"token_logprobs-{k}-T{t}": (lambda be, k=k, t=t: grad_logprobs(be, k, t))
        for k, t in LOGPROB_CASES
    },
    **{
        f"token_entropy-{k}-T{t}": (lambda be, k=k, t=t: grad_entropy(be, k, t))
        for k, t in LOGPROB_CASES
    },
    "masked_mean-axis1": lambda be: grad_masked_mean(be, 1),
    "masked_mean-all": lambda be: grad_masked_mean(be, None),
    **{
        f"kl_estimate-{e}-{which}": (lambda be, e=e, a=a: grad_kl(be, e, a))
        for e in ("k1", "k2", "k3")
        for a, which in ((0, "logprobs"), (1, "ref_logprobs"))
    },
    "nll_loss-normal": lambda be: grad_nll(be, "normal"),
    "nll_loss-large": lambda be: grad_nll(be, "large"),
    "head_terms-whole": lambda be: grad_head_terms(be, None),
    "head_terms-chunks": lambda be: grad_head_terms(be, 4),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradient_against_finite_differences(grad_be, case):
    c = GRAD_CASES[case](grad_be)
    got = grad_be.grad(c.fn, c.args, c.argnum)
    ref = fd_grad(c.oracle, c.args, c.argnum)
    scale = max(1.0, float(np.abs(ref).max()))
    assert_close(f"{grad_be.name} grad {case} vs finite differences", ref, got,
                 atol=c.atol * scale)  # fmt: skip


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradient_mlx_matches_torch(case):
    mlx_be, torch_be = Backend("mlx"), Backend("torch")
    c_mlx, c_torch = GRAD_CASES[case](mlx_be), GRAD_CASES[case](torch_be)
    got = mlx_be.grad(c_mlx.fn, c_mlx.args, c_mlx.argnum)
    ref = torch_be.grad(c_torch.fn, c_torch.args, c_torch.argnum)
    scale = max(1.0, float(np.abs(ref).max()))
    assert_close(f"grad {case} mlx vs torch", ref, got, atol=c_torch.atol * scale)


def test_token_logprobs_gradient_analytic(grad_be):
    # d logprob[t] / d logits[t-1] = (onehot(token t) - softmax(logits[t-1] / T)) / T.
    logits, ids = make_logits("normal"), make_ids()
    w = _weights((B, T))
    c = grad_logprobs(grad_be, "normal", 0.7)
    got = grad_be.grad(c.fn, c.args, c.argnum)
    ref = np.zeros(logits.shape)
    for b in range(B):
        for t in range(1, T):
            z = logits[b, t - 1].astype(np.float64) / 0.7
            p = np.exp(z) / np.exp(z).sum()
            ref[b, t - 1] = w[b, t] * (np.eye(V)[ids[b, t]] - p) / 0.7
    assert np.all(ref[:, -1] == 0.0)  # the last position predicts nothing
    assert_close(f"{grad_be.name} grad token_logprobs analytic", ref, got, atol=c.atol)


def test_stop_gradient_blocks_gradient(grad_be):
    x = np.random.default_rng(9).normal(size=(3, 4)).astype(np.float32)
    ops = grad_be.ops

    def fn(v):
        return grad_be.total(v * ops.stop_gradient(v))

    got = grad_be.grad(fn, [x], 0)
    assert_close(f"{grad_be.name} stop_gradient grad", x, got, 0, 0)  # not 2x
