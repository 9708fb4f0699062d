"""Reading a Hugging Face checkpoint directory's metadata, shared by both backends."""

from __future__ import annotations

import json
import os

from mlxpost.errors import UserError

SUPPORTED_ARCHITECTURES = ("gpt2", "gemma2")


def read_config(path: str) -> dict:
    """config.json of a local checkpoint directory, with clear errors for bad input."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: model directory not found")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(
            f"{config_path}: not found; --model must be a Hugging Face checkpoint directory"
        )
    try:
        with open(config_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f"{config_path}: not valid JSON ({err})") from err
    arch = config.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"{config_path}: model_type {arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if not any(name.endswith(".safetensors") for name in os.listdir(path)):
        raise UserError(f"{path}: no *.safetensors weights found")
    return config


def max_positions(config: dict) -> int | None:
    """The longest sequence the model's positions cover (None: not stated)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if config.get(key):
            return int(config[key])
    return None
