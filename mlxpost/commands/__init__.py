"""Pieces every command shares: error exits, JSON output, backend and model loading."""

from __future__ import annotations

import sys

import click


def fail(message: str, status: int = 2) -> None:
    """One line on stderr, then the exit status (2: bad input)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(status)


def load_model_and_tokenizer(backend_name: str, model_path: str, adapter: str | None, dtype: str):
    """Validate paths, then import the backend and load model, adapter and tokenizer."""
    from mlxpost.adapters import load_adapter
    from mlxpost.backend import get_backend
    from mlxpost.model_dir import read_config
    from mlxpost.tokenizer import load_tokenizer

    read_config(model_path)
    if adapter:
        load_adapter(adapter)
    backend = get_backend(backend_name)
    model = backend.load_model(model_path, dtype)
    if adapter:
        backend.load_adapter(model, adapter)
    return backend, model, load_tokenizer(model_path)
