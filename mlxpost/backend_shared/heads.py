"""The heads' shared parts of both backends' modeling.py.

The scalar head (reward model, critic): a float32 linear map from the final hidden state to
one number, read per token; a reward model reads it at the last non-padding token. It is
drawn in numpy so both backends start from the same weights.

The language-model head's chunking: how many rows (positions) of vocabulary-wide logits a
loss computes at once (mlxpost.functional.head_terms, the backends' map_head_rows).
"""

from __future__ import annotations

import numpy as np


def init_scalar_head(hidden_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, *b"score"])
    weight = rng.normal(0.0, 1.0 / np.sqrt(hidden_size + 1), size=(1, hidden_size))
    return weight.astype(np.float32), np.zeros((1,), dtype=np.float32)


# Default chunk: as many rows as make this many float32 logits (64 MB): a 256,000-token
# vocabulary gets 65 rows at a time, the bundled model's 1,024 a whole batch of 16,384 rows.
LOGITS_CHUNK_ELEMENTS = 2**24


def logits_chunk_rows(setting: int | None, vocab_size: int) -> int | None:
    """Rows of logits computed at once: `setting` rows, or the default's (None), or all of
    them (0: None, no chunking)."""
    if setting == 0:
        return None
    if setting is None:
        return max(1, LOGITS_CHUNK_ELEMENTS // max(1, vocab_size))
    if setting < 0:
        raise ValueError(f"a head chunk needs at least one row, got {setting}")
    return setting


def model_chunk_rows(model) -> int | None:
    """Rows of logits at once for a loaded model (MLXModel or TorchModel: .logits_chunk and
    .config's vocab_size)."""
    return logits_chunk_rows(model.logits_chunk, int(model.config["vocab_size"]))


def row_chunks(count: int, rows: int | None) -> list[slice]:
    """Slices covering range(count) in pieces of `rows` (one slice when rows is None)."""
    if rows is None or rows >= count:
        return [slice(0, count)]
    return [slice(start, min(start + rows, count)) for start in range(0, count, rows)]
