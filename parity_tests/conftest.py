"""Fixtures for the cross-backend tests.

Tiny random checkpoints of every supported architecture are built once per
session by scripts/build_tiny_models.py. Point the suite at a real checkpoint too with
`--parity-model DIR` or `MLXPOST_PARITY_MODEL=DIR` (several: comma-separated);
those cases are skipped when neither is given.
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--parity-model",
        default=None,
        help="real checkpoint directories (comma-separated) to run the parity tests on as well",
    )


def real_checkpoints(config) -> list[str]:
    given = config.getoption("--parity-model") or os.environ.get("MLXPOST_PARITY_MODEL", "")
    return [p for p in given.split(",") if p]


# Every architecture of scripts/build_tiny_models.py: on tiny checkpoints each check,
# multi-step training included, takes well under a second.
ARCHITECTURES = ["gpt2", "gemma2", "llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"]


def pytest_generate_tests(metafunc):
    if "checkpoint" in metafunc.fixturenames:
        params = [f"tiny-{arch}" for arch in ARCHITECTURES] + real_checkpoints(metafunc.config)
        metafunc.parametrize("checkpoint", params, indirect=True)


@pytest.fixture
def checkpoint(request, tiny_dir):
    """A checkpoint directory: a tiny built one, or a real one given by the user."""
    if request.param.startswith("tiny-"):
        return str(tiny_dir / request.param)
    return request.param


@pytest.fixture(scope="session")
def backends():
    """Both backends, or skip: these tests compare one against the other."""
    pytest.importorskip("torch")
    pytest.importorskip("mlx.core")
    from mlxpost.backend import get_backend

    return get_backend("torch"), get_backend("mlx")


@pytest.fixture
def array_backends():
    """(name, ops, convert) for every installed array library, numpy first."""
    import numpy as np

    from mlxpost.ops import NumpyOps

    found = [("numpy", NumpyOps, lambda x: np.asarray(x))]
    try:
        import torch

        from torch_backend.ops import TorchOps

        found.append(
            ("torch", TorchOps(torch.device("cpu")), lambda x: torch.as_tensor(np.asarray(x)))
        )
    except ImportError:
        pass
    try:
        import mlx.core as mx

        from mlxpost.mlx_backend.ops import MLXOps

        found.append(("mlx", MLXOps(), lambda x: mx.array(np.asarray(x))))
    except ImportError:
        pass
    return found


@pytest.fixture
def one_update(backends):
    """compare(checkpoint, loss_fn, batch, metric_keys, scalar_head=False): load the checkpoint
    in both backends with identical LoRA weights (B non-zero), take one AdamW step on the
    batch, and assert the same metrics and updated weights (float32, 1e-5 relative).
    Returns the reference backend's metrics and trainable weights."""
    import numpy as np

    from mlxpost.backend import LoraConfig, OptimConfig
    from mlxpost.parity import parity_lora_init

    def compare(checkpoint, loss_fn, make_batch, metric_keys, scalar_head=False):
        models = []
        for backend in backends:
            model = backend.load_model(str(checkpoint))
            if scalar_head:
                backend.attach_scalar_head(model, seed=0)
            backend.attach_lora(model, LoraConfig(rank=4, alpha=8.0))
            backend.set_parameters(model, parity_lora_init(backend.parameters(model, True), 0))
            models.append(model)
        batch = make_batch(backends[0], models[0])
        optim = OptimConfig(learning_rate=1e-3, eps=1e-6, warmup_steps=0, total_steps=1)
        results, weights = [], []
        for backend, model in zip(backends, models):
            optimizer = backend.make_optimizer(model, optim)
            results.append(backend.train_step(model, optimizer, loss_fn, [batch]))
            weights.append(backend.parameters(model, trainable_only=True))
        for key in metric_keys:
            assert results[0][key] == pytest.approx(results[1][key], rel=1e-5, abs=1e-7), key
        for name in weights[0]:
            diff = np.abs(weights[0][name] - weights[1][name]).max()
            scale = max(1.0, float(np.abs(weights[0][name]).max()))
            assert diff <= 1e-5 * scale, f"{name}: {diff:.3g}"
        return results[0], weights[0]

    return compare
