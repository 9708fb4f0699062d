"""Running a padded batch's transformer trunk without its padding.

A rollout batch is laid out as (left-padded prompt, right-padded completion): its width is the
longest prompt plus the longest completion, and on the bundled model's GRPO steps about half of
its positions were padding. The trunk's cost is per position, padding or not, so
`unpad_plan` lays each row's real tokens end to end into packed rows as long as the longest
row (first-fit decreasing, as --pack does), each row one segment of the packed mask. The trunk
runs on the packed rows, with the packed-row masks and positions that keep every row's
attention to itself, and its hidden states go back to the original (B, T) layout, padding
positions 0. The loss head (functional.head_terms) then runs only on the positions whose next
token is real, and the terms of the others are 0.

A real token sees the same keys at the same positions either way: a key is seen only if real,
positions count a row's real tokens, and a row's real tokens are contiguous (checked; a
sliding window measures slots, which are then the same distances). Only the rounding of the
matmuls' different shapes differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlxpost.data.tokenize import pack_lengths

MIN_SAVING = 0.2  # pack only when it drops at least this share of the positions


@dataclass
class UnpadPlan:
    gather: np.ndarray  # (R, L) int64: flat index into the (B * T) tokens, B * T for a filler
    segments: np.ndarray  # (R, L) int64: the packed mask, segment ids 1.. (0 for filler)
    restore: np.ndarray  # (B * T,) int64: flat index into the (R * L) packed states, R * L
    # (one past the end: a zero row the caller appends) for a padding position
    # The loss head's rows: of the B * (T - 1) positions that predict a next token, those whose
    # next token is real (head_terms computes only these; the others' terms are 0).
    head_keep: np.ndarray  # (n,) int64: flat index into the B * (T - 1) predicting positions
    head_restore: np.ndarray  # (B * (T - 1),) int64: index into the n kept, n for the others


def unpad_plan(attention_mask: np.ndarray, min_saving: float = MIN_SAVING) -> UnpadPlan | None:
    """How to pack a (B, T) 0/1 mask's rows, or None when packing would save less than
    `min_saving` of the positions, the mask is already packed (segment ids above 1), or a row's
    real tokens are not contiguous."""
    mask = np.asarray(attention_mask)
    if mask.ndim != 2 or mask.shape[0] < 2 or mask.size == 0 or mask.max() > 1:
        return None
    batch, width = mask.shape
    real = mask > 0
    lengths = real.sum(axis=1)
    capacity = int(lengths.max())
    if capacity == 0:
        return None
    starts = np.argmax(real, axis=1)
    ends = width - np.argmax(real[:, ::-1], axis=1)  # one past each row's last real token
    if np.any((ends - starts != lengths) & (lengths > 0)):
        return None  # a row with a gap between real tokens
    rows = pack_lengths(lengths, capacity)
    if len(rows) * capacity > (1.0 - min_saving) * batch * width:
        return None
    gather = np.full((len(rows), capacity), batch * width, dtype=np.int64)
    segments = np.zeros((len(rows), capacity), dtype=np.int64)
    restore = np.full(batch * width, len(rows) * capacity, dtype=np.int64)
    for packed, members in enumerate(rows):
        offset, segment = packed * capacity, 0
        for row in members:
            count = int(lengths[row])
            if count == 0:
                continue
            segment += 1
            source = row * width + starts[row] + np.arange(count)
            target = offset + np.arange(count)
            gather.reshape(-1)[target] = source
            segments.reshape(-1)[target] = segment
            restore[source] = target
            offset += count
    predicts_real = real[:, 1:].reshape(-1)
    head_keep = np.flatnonzero(predicts_real).astype(np.int64)
    head_restore = np.full(predicts_real.size, head_keep.size, dtype=np.int64)
    head_restore[head_keep] = np.arange(head_keep.size)
    return UnpadPlan(gather, segments, restore, head_keep, head_restore)


PLAN_KEYS = ("unpad_gather", "unpad_segments", "unpad_restore", "unpad_keep", "unpad_put_back")


def plan_arrays(batch: dict) -> dict[str, np.ndarray]:
    """The plan for a batch's attention mask as extra batch arrays (PLAN_KEYS), for a backend
    whose training step is traced and so cannot read the mask on the host; {} when no plan."""
    mask = batch.get("attention_mask")
    plan = unpad_plan(mask) if isinstance(mask, np.ndarray) else None
    if plan is None:
        return {}
    arrays = (plan.gather, plan.segments, plan.restore, plan.head_keep, plan.head_restore)
    return dict(zip(PLAN_KEYS, arrays))
