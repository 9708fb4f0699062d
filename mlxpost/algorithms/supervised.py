"""Supervised data on the training loop: tokenised examples, seeded batches, held-out figures.

Shared by SFT and distillation (and, for `Batches` and `collate`, by RM and
DPO). Which examples make a step's batch is mlxpost.batching's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlxpost.batching import step_indices
from mlxpost.data import (
    TokenizeConfig,
    apply_filters,
    load_examples,
    pack_lengths,
    pad_masks,
    pad_packed,
    tokenize_examples,
)
from mlxpost.distributed import shard
from mlxpost.errors import UserError
from mlxpost.functional import head_terms, masked_mean, prediction_mask

# Sequence widths are rounded up to a multiple of this, so MLX compiles few distinct shapes.
WIDTH_MULTIPLE = 16


def load_tokenized(
    path: str,
    command: str,
    tokenizer,
    cfg: TokenizeConfig,
    say,
    limit: int | None = None,
    filters: bool = True,
):
    """Load, filter and tokenise a dataset, reporting what was dropped and why."""
    fmt, examples = load_examples(path, command)
    if limit:
        examples = examples[:limit]
    if filters:
        examples, reports = apply_filters(examples, quality=True, duplicates=True, near=False)
        for report in reports:
            if report["dropped"]:
                say(
                    f"{path}: filter {report['filter']} dropped {report['dropped']} of {report['total']} ({report['reasons']})"
                )
    tokenized, lengths = tokenize_examples(examples, tokenizer, cfg)
    check_lengths(path, len(tokenized), lengths, cfg.max_length, say, "examples", "filtering")
    say(f"{path}: {len(tokenized)} examples ({fmt})")
    return tokenized


def check_lengths(path: str, kept: int, lengths: dict, max_length, say, unit: str, before: str):
    """Say what the length limit dropped, truncated or split; fail when nothing is left."""
    dropped = lengths["dropped_too_long"] + lengths["dropped_prompt_too_long"]
    if dropped or lengths["truncated"]:
        say(
            f"{path}: {dropped} {unit} longer than {max_length} tokens dropped, {lengths['truncated']} truncated"
        )
    if lengths.get("split"):
        say(
            f"{path}: {lengths['split']} texts longer than {max_length} tokens split into "
            f"{lengths['blocks']} blocks"
        )
    if not kept:
        raise UserError(
            f"{path}: no {unit} left after {before} and the length limit ({max_length} tokens)"
        )


def collate(examples, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded (B, T) input_ids, attention_mask and float32 loss_mask."""
    width = max(len(ex.input_ids) for ex in examples)
    width = -(-width // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
    ids = np.full((len(examples), width), pad_id, np.int32)
    attention = np.zeros((len(examples), width), np.int32)
    loss_mask = np.zeros((len(examples), width), np.float32)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = ex.input_ids
        attention[row, :n] = 1
        loss_mask[row, :n] = ex.loss_mask
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}


def collate_packed(rows, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded (B, T) input_ids, attention_mask holding segment ids (0 padding, k the
    row's k-th example) and float32 loss_mask, of rows that each hold several examples. The
    first token of each example never counts in the loss (nothing in its example predicts
    it), whatever its loss mask says."""
    width = max(sum(len(ex.input_ids) for ex in row) for row in rows)
    width = -(-width // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
    ids, segments = pad_packed([[ex.input_ids for ex in row] for row in rows], pad_id, width)
    joined = [[m for ex in row for m in ex.loss_mask] for row in rows]
    loss_mask = pad_masks(joined, "right", width).astype(np.float32)
    loss_mask *= prediction_mask(segments)
    return {"input_ids": ids, "attention_mask": segments, "loss_mask": loss_mask}


@dataclass
class Batches:
    """The batch of each step: `batch_size` examples, or with `packing` `batch_size` rows of
    examples packed up to `max_length` tokens (pack_lengths: first-fit decreasing, fixed
    for the run, so a step's batch stays a pure function of the step)."""

    examples: list
    batch_size: int
    seed: int
    pad_id: int
    packing: bool = False
    max_length: int | None = None

    def __post_init__(self):
        self.rows = None
        if self.packing:
            if self.max_length is None:
                raise ValueError("packing needs max_length: the tokens of a row")
            lengths = [len(ex.input_ids) for ex in self.examples]
            self.rows = pack_lengths(lengths, self.max_length)

    @property
    def units(self) -> int:
        """How many examples (rows, with packing) an epoch draws from."""
        return len(self.rows) if self.rows is not None else len(self.examples)

    def indices(self, step: int) -> np.ndarray:
        """This rank's share of the step's examples (all of them without a launcher)."""
        return shard(step_indices(self.seed, step, self.batch_size, self.units))

    def batch(self, step: int) -> dict[str, np.ndarray]:
        if self.rows is None:
            return collate([self.examples[i] for i in self.indices(step)], self.pad_id)
        rows = [[self.examples[i] for i in self.rows[r]] for r in self.indices(step)]
        return collate_packed(rows, self.pad_id)


def nll_and_kl_loss(ops, forward, batch, kl_beta: float = 0.0, measure_kl: bool = False):
    """Masked NLL, plus beta * KL(policy || reference) over the vocabulary at the same tokens.

    The KL is the exact per-position KL of the next-token distributions (not a
    sampled estimate), averaged over the loss tokens (InstructGPT-style penalty).
    """
    with_kl = kl_beta > 0 or measure_kl
    terms = head_terms(
        ops,
        forward,
        batch["input_ids"],
        batch["attention_mask"],
        other="reference" if with_kl else None,
    )
    nll = -masked_mean(ops, terms["logprobs"], batch["loss_mask"])
    metrics = {"nll": nll}
    loss = nll
    if with_kl:
        kl = masked_mean(ops, terms["divergence"], batch["loss_mask"])
        metrics["kl"] = kl
        if kl_beta > 0:
            loss = nll + kl_beta * kl
    return loss, metrics


def held_out(
    backend, model, loss_fn, examples, pad_id: int, batch_size: int = 32
) -> dict[str, float]:
    """Token-weighted means of loss_fn's metrics over examples (no gradients)."""
    order = np.argsort([len(ex.input_ids) for ex in examples], kind="stable")
    totals: dict[str, float] = {}
    tokens = 0.0
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start : start + batch_size]], pad_id)
        count = float(batch["loss_mask"].sum())
        _, metrics = backend.compute_loss(model, loss_fn, batch)
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value * count
        tokens += count
    return {k: v / max(tokens, 1.0) for k, v in totals.items()}
