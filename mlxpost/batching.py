"""Which rows go into which batch: epoch permutations, step batches, and splits.

Every algorithm draws its step's examples (or prompts) with `step_indices`: a
permutation per epoch seeded by (seed, epoch), so the batch of step s is a pure
function of s and a resumed run sees exactly what an uninterrupted one would.
A step's rows are then split with `split_indices` / `split_batch` into
microbatches (gradient accumulation) or minibatches (PPO), weighted by their
loss tokens or their rows so that accumulated gradients equal the whole batch's.
"""

from __future__ import annotations

import numpy as np


def epoch_permutation(seed: int, epoch: int, count: int) -> np.ndarray:
    """The order of `count` items in `epoch`."""
    return np.random.default_rng([seed, epoch]).permutation(count)


def step_indices(seed: int, step: int, batch_size: int, count: int) -> np.ndarray:
    """The `batch_size` item indices of `step`, running on into the next epoch's order."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(positions, count)
    orders = {int(e): epoch_permutation(seed, int(e), count) for e in np.unique(epochs)}
    return np.array([orders[int(e)][o] for e, o in zip(epochs, offsets)])


def split_indices(indices: np.ndarray, count: int) -> list[np.ndarray]:
    """`indices` in `count` consecutive parts (sizes differ by at most one; the first ones are
    larger); at most one part per index."""
    return [part for part in np.array_split(np.asarray(indices), count) if len(part)]


def split_batch(
    batch: dict[str, np.ndarray], count: int, weigh: str = "tokens"
) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    """A batch's rows in `count` parts, with the weight of each for accumulation: its
    `loss_mask` tokens ("tokens"; the training step weighs parts equally if none has any)
    or its rows ("rows")."""
    rows = batch["input_ids"].shape[0]
    parts = [
        {k: v[part] for k, v in batch.items()} for part in split_indices(np.arange(rows), count)
    ]
    if weigh == "rows":
        return parts, [float(part["input_ids"].shape[0]) for part in parts]
    return parts, [float(part["loss_mask"].sum()) for part in parts]
