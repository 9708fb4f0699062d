"""Preference pairs on the training loop: loading, stacking, held-out means, one step.

Shared by the reward model (rm.py) and the preference optimisers (dpo.py,
kto.py, through preference.py). A batch of B pairs is 2B rows, chosen over
rejected, so one forward scores both sides.
"""

from __future__ import annotations

import numpy as np

from mlxpost.algorithms.supervised import check_lengths, collate
from mlxpost.batching import split_indices
from mlxpost.data import TokenizeConfig, deduplicate, load_examples, tokenize_preferences
from mlxpost.distributed import rank_seed
from mlxpost.functional import last_token_index
from mlxpost.loop import Session


def load_pairs(
    path: str,
    command: str,
    tokenizer,
    cfg: TokenizeConfig,
    say,
    limit: int | None = None,
):
    """(tokenised (chosen, rejected) pairs, their PreferenceExamples), exact duplicates dropped.

    No quality filter: a rejected completion is often bad on purpose (loops, rudeness)."""
    fmt, examples = load_examples(path, command)
    if limit:
        examples = examples[:limit]
    examples, report = deduplicate(examples)
    if report["dropped"]:
        say(f"{path}: {report['dropped']} exact duplicate pairs dropped")
    pairs, lengths = tokenize_preferences(examples, tokenizer, cfg)
    check_lengths(path, len(pairs), lengths, cfg.max_length, say, "pairs", "deduplication")
    kept = [examples[chosen.index] for chosen, _ in pairs]
    say(f"{path}: {len(pairs)} preference pairs ({fmt})")
    return pairs, kept


def collate_pairs(pairs, pad_id: int, margins=None) -> dict[str, np.ndarray]:
    """B pairs as one right-padded batch of 2B rows: chosen in rows [0, B), rejected in
    [B, 2B); with `last_index` (2B,), the last real token of each row, and `margin` (B,)."""
    rows = [chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs]
    batch = collate(rows, pad_id)
    batch["last_index"] = last_token_index(batch["attention_mask"]).astype(np.int32)
    batch["margin"] = (
        np.zeros(len(pairs), np.float32) if margins is None else np.asarray(margins, np.float32)
    )
    return batch


def held_out_pairs(
    backend, model, loss_fn, pairs, pad_id: int, batch_size: int, margins=None, extra=None
) -> dict[str, float]:
    """Pair-weighted means of loss_fn's loss and metrics over `pairs` (no gradients).

    extra(indices) may return more arrays for each batch (e.g. reference logprobs)."""
    order = np.argsort([len(c.input_ids) + len(r.input_ids) for c, r in pairs], kind="stable")
    margins = np.zeros(len(pairs), np.float32) if margins is None else margins
    totals: dict[str, float] = {}
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = collate_pairs([pairs[i] for i in indices], pad_id, margins[indices])
        if extra is not None:
            batch.update(extra(indices))
        loss, metrics = backend.compute_loss(model, loss_fn, batch)
        for key, value in {"loss": loss, **metrics}.items():
            totals[key] = totals.get(key, 0.0) + float(value) * len(indices)
    return {key: value / max(len(pairs), 1) for key, value in totals.items()}


def pair_step(session: Session, loss_fn, batches, step: int, make_batch) -> dict[str, float]:
    """One optimizer step over the step's examples, split into --grad-accum chunks that
    weigh by their size, so the loss is a mean over every example (RM, DPO and KTO)."""
    cfg = session.cfg
    chunks = split_indices(batches.indices(step), cfg.grad_accum)
    parts = [make_batch(chunk) for chunk in chunks]
    session.backend.seed(rank_seed(cfg.seed + step))  # LoRA dropout draws, per rank
    weights = [float(len(chunk)) for chunk in chunks]
    metrics = session.backend.train_step(session.model, session.optimizer, loss_fn, parts, weights)
    metrics["tokens"] = float(sum(part["attention_mask"].sum() for part in parts))
    return metrics
