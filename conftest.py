"""Fixtures for tests/ and parity_tests/: tiny random checkpoints, built once per session."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


def load_builder():
    spec = importlib.util.spec_from_file_location(
        "build_tiny_models", ROOT / "scripts" / "build_tiny_models.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_tiny_models"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A folder holding tiny-<arch>/ for every architecture of scripts/build_tiny_models.py
    (random weights, chat-template tokenizer)."""
    pytest.importorskip("torch")  # the builder writes checkpoints with transformers
    builder = load_builder()
    root = tmp_path_factory.mktemp("tiny-models")
    for arch in builder.ARCHITECTURES:
        builder.build(arch, str(root / f"tiny-{arch}"))
    return root


@pytest.fixture(scope="session")
def tiny_builder():
    """scripts/build_tiny_models.py as a module (build, build_tokenizer)."""
    return load_builder()
