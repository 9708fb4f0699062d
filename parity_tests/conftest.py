"""Fixtures for the cross-backend tests.

Tiny random GPT-2 and Gemma-2 checkpoints are built once per session by
scripts/build_tiny_models.py. Point the suite at a real checkpoint too with
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


def pytest_generate_tests(metafunc):
    if "checkpoint" in metafunc.fixturenames:
        params = ["tiny-gpt2", "tiny-gemma2"] + real_checkpoints(metafunc.config)
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
