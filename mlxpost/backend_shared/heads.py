"""The scalar head (reward model, critic) shared by both backends' modeling.py.

A float32 linear map from the final hidden state to one number, read per
token; a reward model reads it at the last non-padding token. It is drawn in
numpy so both backends start from the same weights.
"""

from __future__ import annotations

import numpy as np


def init_scalar_head(hidden_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, *b"score"])
    weight = rng.normal(0.0, 1.0 / np.sqrt(hidden_size + 1), size=(1, hidden_size))
    return weight.astype(np.float32), np.zeros((1,), dtype=np.float32)
