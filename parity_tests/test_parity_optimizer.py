"""The parity report's AdamW check passes a correct optimizer and fails a wrong one.

In half precision the two backends' updated weights legitimately differ by
2 * lr wherever a near-zero gradient changes sign (see mlxpost/parity.py), so
the check compares each backend's step with a numpy AdamW on that backend's
own gradient; these tests make sure that leaves no room for a wrong optimizer.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from mlxpost.parity import ParityRun, ParitySetup


def without_bias_correction(backend, model, cfg):
    optimizer = backend.make_optimizer(model, cfg)
    optimizer.adamw.bias_correction = False  # mlx's Adam: m and v used as they are
    return optimizer


def changed(**fields):
    return lambda backend, model, cfg: backend.make_optimizer(model, replace(cfg, **fields))


WRONG_OPTIMIZERS = {
    "learning rate 1% high": changed(learning_rate=1.01e-3),  # ParitySetup's is 1e-3
    "eps 1e-6": changed(eps=1e-6),
    "beta1 0.8": changed(beta1=0.8),
    "beta2 0.99": changed(beta2=0.99),
    "no weight decay": changed(weight_decay=0.0),
    "no bias correction": without_bias_correction,
}


class WrongOptimizer:
    """The MLX backend with an AdamW that departs from the configured one."""

    def __init__(self, backend, make_optimizer):
        self.backend, self.wrong = backend, make_optimizer

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def make_optimizer(self, model, cfg):
        return self.wrong(self.backend, model, cfg)


@pytest.mark.parametrize(
    "dtype, wrong",
    [("float32", name) for name in WRONG_OPTIMIZERS] + [("bfloat16", "learning rate 1% high")],
)
def test_a_wrong_optimizer_fails_the_step_check(tiny_dir, backends, dtype, wrong):
    torch_backend, mlx_backend = backends
    setup = ParitySetup(model=str(tiny_dir / "tiny-gemma2"), dtype=dtype)
    run = ParityRun(setup, torch_backend, WrongOptimizer(mlx_backend, WRONG_OPTIMIZERS[wrong]))
    checks = run.check_optimizer_step()
    assert not all(c.ok for c in checks), "\n".join(
        f"{c.name}: max {c.max_abs_diff:.3g}, tol {c.tolerance:.3g} {c.detail}" for c in checks
    )


def test_the_correct_optimizer_passes_in_bfloat16_despite_sign_flips(tiny_dir, backends):
    """Near-zero gradients change sign between the backends in bfloat16; the check allows it."""
    run = ParityRun(ParitySetup(model=str(tiny_dir / "tiny-gemma2"), dtype="bfloat16"), *backends)
    step, gradients = run.check_optimizer_step()
    assert step.ok and gradients.ok, f"{step.detail}; {gradients.detail}"
    assert step.max_abs_diff < 1e-6  # float32 rounding, though the weights differ by up to 2 * lr
