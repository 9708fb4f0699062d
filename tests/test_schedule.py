"""The learning-rate schedule (linear warmup, cosine decay) and the microbatch helpers."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from mlxpost.backend import LoraConfig, OptimConfig
from mlxpost.backend_shared.training import average_metrics, learning_rate, normalise_weights

LR = 3e-4


def schedule(cfg, steps):
    return np.array([learning_rate(cfg, s) for s in steps])


# --------------------------------------------------------------------------- warmup


@pytest.mark.parametrize("warmup", [1, 4, 10])
def test_warmup_is_linear_from_lr_over_warmup_to_lr(warmup):
    cfg = OptimConfig(learning_rate=LR, warmup_steps=warmup, total_steps=100)
    lrs = schedule(cfg, range(warmup))
    expected = [LR * k / warmup for k in range(1, warmup + 1)]  # LR/w, 2 LR/w, ..., LR
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    assert lrs[0] == pytest.approx(LR / warmup, rel=1e-12)
    assert lrs[-1] == pytest.approx(LR, rel=1e-12)
    if warmup > 1:
        np.testing.assert_allclose(np.diff(lrs), LR / warmup, rtol=1e-9)  # constant slope


def test_peak_is_reached_at_the_end_of_warmup():
    cfg = OptimConfig(learning_rate=LR, warmup_steps=10, total_steps=60, min_lr_ratio=0.1)
    lrs = schedule(cfg, range(80))
    assert lrs.max() == pytest.approx(LR, rel=1e-12)
    assert np.argmax(lrs) == 9  # the last warmup step
    assert lrs[10] == pytest.approx(LR, rel=1e-12)  # cosine starts at its top
    assert np.all(np.diff(lrs[:10]) > 0), "warmup increases"
    assert np.all(np.diff(lrs[10:]) <= 1e-18), "decay never increases"
    assert np.all(np.diff(lrs[10:61]) < 0), "decay strictly decreases until total_steps"


# --------------------------------------------------------------------------- cosine


@pytest.mark.parametrize("warmup", [0, 5])
@pytest.mark.parametrize("min_ratio", [0.0, 0.1, 0.5])
def test_cosine_decay_values(warmup, min_ratio):
    total = warmup + 100
    cfg = OptimConfig(
        learning_rate=LR, warmup_steps=warmup, total_steps=total, min_lr_ratio=min_ratio
    )
    span = total - warmup
    floor = LR * min_ratio
    # Fixed points of a half cosine from LR to floor over `span` steps.
    points = {
        0.0: LR,
        0.25: floor + (LR - floor) * (1 + math.sqrt(0.5)) / 2,
        0.5: (LR + floor) / 2,
        0.75: floor + (LR - floor) * (1 - math.sqrt(0.5)) / 2,
        1.0: floor,
    }
    for fraction, expected in points.items():
        step = warmup + round(fraction * span)
        got = learning_rate(cfg, step)
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-18), (fraction, step)


@pytest.mark.parametrize("warmup", [0, 5])
def test_cosine_is_symmetric_about_its_midpoint(warmup):
    cfg = OptimConfig(learning_rate=LR, warmup_steps=warmup, total_steps=45, min_lr_ratio=0.2)
    for k in range(0, 45 - warmup + 1):
        a = learning_rate(cfg, warmup + k)
        b = learning_rate(cfg, cfg.total_steps - k)
        assert a + b == pytest.approx(LR * (1 + 0.2), rel=1e-12), k


@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
def test_reaches_floor_at_total_steps_and_stays(min_ratio):
    cfg = OptimConfig(learning_rate=LR, warmup_steps=3, total_steps=50, min_lr_ratio=min_ratio)
    floor = LR * min_ratio
    assert learning_rate(cfg, 49) > floor
    for step in (50, 51, 75, 500, 10_000):
        assert learning_rate(cfg, step) == pytest.approx(floor, abs=1e-18), step


def test_stays_within_floor_and_peak():
    cfg = OptimConfig(learning_rate=LR, warmup_steps=7, total_steps=40, min_lr_ratio=0.25)
    lrs = schedule(cfg, range(200))
    assert np.all(lrs[7:] >= LR * 0.25 - 1e-18)
    assert np.all(lrs <= LR * (1 + 1e-12))
    assert np.all(lrs > 0)


# --------------------------------------------------------------------------- no warmup


def test_no_warmup_starts_at_peak():
    cfg = OptimConfig(learning_rate=LR, warmup_steps=0, total_steps=20, min_lr_ratio=0.0)
    lrs = schedule(cfg, range(25))
    assert lrs[0] == pytest.approx(LR, rel=1e-12)
    assert lrs[10] == pytest.approx(LR / 2, rel=1e-12)
    assert lrs[20] == pytest.approx(0.0, abs=1e-18)
    assert np.all(np.diff(lrs[:21]) < 0)
    assert np.all(lrs[20:] == lrs[20])


def test_library_defaults_agree_with_the_training_commands():
    from mlxpost.config import TrainConfig

    assert TrainConfig().optim_config() == replace(OptimConfig(), total_steps=TrainConfig().steps)
    assert TrainConfig().lora_config() == LoraConfig()


def test_no_warmup_and_no_floor_is_a_plain_cosine():
    cfg = OptimConfig(warmup_steps=0, min_lr_ratio=0.0)
    assert learning_rate(cfg, 0) == pytest.approx(cfg.learning_rate)
    mid = cfg.total_steps // 2
    assert learning_rate(cfg, mid) == pytest.approx(cfg.learning_rate / 2, rel=1e-9)
    assert learning_rate(cfg, cfg.total_steps) == pytest.approx(0.0, abs=1e-18)


# --------------------------------------------------------------------------- normalise_weights


@pytest.mark.parametrize("count", [1, 3, 8])
def test_normalise_weights_default_is_equal(count):
    got = normalise_weights(count, None)
    assert isinstance(got, list) and len(got) == count
    assert all(type(w) is float for w in got)
    assert got == pytest.approx([1.0 / count] * count, rel=1e-15)
    assert sum(got) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize(
    "weights,expected",
    [
        ([1, 3], [0.25, 0.75]),
        ((2.0, 2.0, 4.0), [0.25, 0.25, 0.5]),
        ([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]),
        ([5], [1.0]),
        ([0, 7, 0], [0.0, 1.0, 0.0]),
        (np.array([10.0, 30.0, 60.0], dtype=np.float32), [0.1, 0.3, 0.6]),
    ],
)
def test_normalise_weights_normalises(weights, expected):
    before = list(weights)
    got = normalise_weights(len(weights), weights)
    assert isinstance(got, list)
    assert all(type(w) is float for w in got)
    assert got == pytest.approx(expected, rel=1e-7)
    assert sum(got) == pytest.approx(1.0, rel=1e-12)
    assert list(weights) == before, "the caller's weights are not modified"


def test_normalise_weights_is_scale_invariant():
    a = normalise_weights(3, [1.0, 2.0, 5.0])
    b = normalise_weights(3, [100.0, 200.0, 500.0])
    assert a == pytest.approx(b, rel=1e-15)


@pytest.mark.parametrize(
    "count,weights,match",
    [
        (0, None, "at least one microbatch"),
        (0, [], "at least one microbatch"),
        (2, [1.0], "1 weights for 2 microbatches"),
        (2, [1.0, 1.0, 1.0], "3 weights for 2 microbatches"),
        (2, [0.0, 0.0], "positive"),
        (2, [-1.0, -3.0], "positive"),
        (3, [1.0, -1.0, 0.0], "positive"),
    ],
)
def test_normalise_weights_errors(count, weights, match):
    with pytest.raises(ValueError, match=match):
        normalise_weights(count, weights)


# --------------------------------------------------------------------------- average_metrics


def test_average_metrics_is_weighted():
    metrics = [{"loss": 1.0, "acc": 0.5}, {"loss": 3.0, "acc": 1.0}]
    got = average_metrics(metrics, [0.25, 0.75])
    assert got == pytest.approx({"loss": 2.5, "acc": 0.875}, rel=1e-15)
    assert list(got) == ["loss", "acc"]
    assert all(type(v) is float for v in got.values())


def test_average_metrics_with_default_weights_is_the_mean():
    rng = np.random.default_rng(0)
    metrics = [{"a": float(x), "b": float(y)} for x, y in rng.normal(size=(5, 2))]
    got = average_metrics(metrics, normalise_weights(5, None))
    assert got["a"] == pytest.approx(np.mean([m["a"] for m in metrics]), rel=1e-12)
    assert got["b"] == pytest.approx(np.mean([m["b"] for m in metrics]), rel=1e-12)


def test_average_metrics_accepts_numpy_scalars():
    metrics = [{"kl": np.float32(0.5)}, {"kl": np.float64(1.5)}, {"kl": np.array(2.0)}]
    got = average_metrics(metrics, [0.5, 0.25, 0.25])
    assert type(got["kl"]) is float
    assert got["kl"] == pytest.approx(0.25 + 0.375 + 0.5, rel=1e-7)


def test_average_metrics_single_and_empty():
    assert average_metrics([{"x": 4.0}], [1.0]) == {"x": 4.0}
    assert average_metrics([], []) == {}
