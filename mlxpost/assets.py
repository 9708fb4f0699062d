"""The bundled default model and datasets, shipped inside the package."""

from __future__ import annotations

import os

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DATA = os.path.join(ASSETS, "data")
DEFAULT_MODEL = os.path.join(ASSETS, "model")

# The default --data of each command (held-out splits for evaluation).
DEFAULT_DATA = {
    "eval-math": os.path.join(DATA, "math", "test.jsonl"),
    "sft": os.path.join(DATA, "math", "train.jsonl"),
    "sft-eval": os.path.join(DATA, "math", "test.jsonl"),
    "text-eval": os.path.join(DATA, "text", "test.jsonl"),
    "distill": os.path.join(DATA, "reasoning", "train.jsonl"),
    "grpo": os.path.join(DATA, "rl", "prompts.jsonl"),
    "ppo": os.path.join(DATA, "rl", "prompts.jsonl"),
    "distill-eval": os.path.join(DATA, "reasoning", "test.jsonl"),
    # Both preference files: the explicit pairs alone stop at 0.88 held-out accuracy, both
    # reach 0.91 (docs/results.md).
    "rm": ",".join(
        os.path.join(DATA, "preferences", name) for name in ("train.jsonl", "hh_train.jsonl")
    ),
    "rm-eval": os.path.join(DATA, "preferences", "test.jsonl"),
    "dpo": os.path.join(DATA, "preferences", "train.jsonl"),
    "dpo-eval": os.path.join(DATA, "preferences", "test.jsonl"),
}


def default_model() -> str:
    return DEFAULT_MODEL


def default_data(command: str) -> str:
    return DEFAULT_DATA[command]


def training_data(command: str, data: str | None, eval_data: str | None) -> tuple[str, str | None]:
    """(--data, --eval-data) of a training command, with the bundled defaults: the held-out
    split is bundled only alongside the bundled training data (yours has none by default)."""
    if data:
        return data, eval_data
    return default_data(command), eval_data or default_data(f"{command}-eval")
