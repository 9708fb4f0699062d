"""KTO: preference optimisation from unpaired completions labelled desirable or not.

Kahneman-Tversky optimisation (Ethayarajh et al., 2024, eq. 8). Paired data is
split: chosen completions are desirable, rejected ones not. With
r = log pi(y|x) - log ref(y|x), the sum of the completion's token log-ratios,

    z0 = max(0, mean_j [log pi(y'_j|x_j) - log ref(y'_j|x_j)])
    loss = lambda_D (1 - sig(beta (r - z0)))  for desirable y,
           lambda_U (1 - sig(beta (z0 - r)))  for undesirable y,  averaged over the batch.

z0, the paper's reference point (a batch estimate of KL(pi || ref)), is taken
on mismatched pairs: example j's prompt with another example's completion y'_j,
over the examples of each microbatch, and carries no gradient. As in TRL's KL
dataset, each example's partner is fixed once (a seeded derangement: example
perm[k] gets the completion of perm[k+1]), so the mismatched sequences' reference
logprobs can be precomputed like the others.

It runs as `mlxpost dpo --loss kto`. The reference (checkpoint or adapter off,
precomputed or live logprobs) and the held-out evaluations are preference.py's,
shared with DPO: held-out preference pairs are ranked by the implicit reward
beta r; held-out data without pairs is scored by KTO's loss instead.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from mlxpost.algorithms.preference import (
    DPOConfig,
    PreferenceAlgorithm,
    implicit_rewards,
    policy_and_reference,
)
from mlxpost.algorithms.supervised import check_lengths, collate
from mlxpost.data import (
    TokenizeConfig,
    TokenizedExample,
    deduplicate,
    load_examples,
    tokenize_examples,
)
from mlxpost.errors import UserError
from mlxpost.loop import Session

# ---- the math: pure functions of sequence logprobs ----


def kto_reference_point(ops, policy_mismatched, ref_mismatched):
    """KTO's z0: max(0, mean log-ratio of the mismatched pairs), without gradient."""
    return ops.stop_gradient(ops.maximum(ops.mean(policy_mismatched - ref_mismatched), 0.0))


def kto_objective(
    ops,
    policy,
    ref,
    desirable,
    policy_mismatched,
    ref_mismatched,
    beta,
    desirable_weight=1.0,
    undesirable_weight=1.0,
):
    """(mean loss, metrics) of KTO: sequence logprobs (B,) of labelled completions, `desirable`
    (B,) 1/0, and the sequence logprobs (B,) of mismatched pairs for z0."""
    z0 = kto_reference_point(ops, policy_mismatched, ref_mismatched)
    ratio = policy - ref
    gain = desirable_weight * (1.0 - ops.sigmoid(beta * (ratio - z0)))
    loss = undesirable_weight * (1.0 - ops.sigmoid(beta * (z0 - ratio)))
    value = ops.mean(desirable * gain + (1.0 - desirable) * loss)
    undesirable = 1.0 - desirable
    # Each count is taken once (mlx 0.32's compiled step can fail on repeated reductions).
    n_desirable = ops.maximum(ops.sum(desirable), 1.0)
    n_undesirable = ops.maximum(ops.sum(undesirable), 1.0)
    metrics = {
        "kl": z0,
        "reward_desirable": ops.sum(beta * ratio * desirable) / n_desirable,
        "reward_undesirable": ops.sum(beta * ratio * undesirable) / n_undesirable,
        "logp_desirable": ops.sum(policy * desirable) / n_desirable,
        "logp_undesirable": ops.sum(policy * undesirable) / n_undesirable,
    }
    return value, metrics


def kto_loss(ops, forward, batch, cfg: DPOConfig):
    """KTO's loss of a batch of 2B rows (see KTO.batch): B labelled completions (`label` (B,)
    1/0) then their B mismatched pairs. `ref_logps` (2B,) holds precomputed reference
    logprobs; in live mode they are computed."""
    _, policy, ref = policy_and_reference(ops, forward, batch, cfg.reference_mode, average=False)
    rows = policy.shape[0] // 2
    return kto_objective(
        ops,
        policy[:rows],
        ref[:rows],
        batch["label"],
        policy[rows:],
        ref[rows:],
        cfg.beta,
        cfg.desirable_weight,
        cfg.undesirable_weight,
    )


def pair_ranking(ops, forward, batch, cfg: DPOConfig):
    """(reward margin, metrics) of a batch of 2B rows, chosen then rejected: how the implicit
    reward beta r ranks held-out pairs. KTO has no loss on pairs; the margin takes the loss's
    place and is not reported."""
    _, policy, ref = policy_and_reference(ops, forward, batch, cfg.reference_mode, average=False)
    rows = policy.shape[0] // 2
    _, metrics = implicit_rewards(
        ops, policy[:rows], policy[rows:], ref[:rows], ref[rows:], cfg.beta
    )
    return metrics["reward_margin"], metrics


# ---- unpaired data ----


def load_unpaired(path: str, tokenizer, cfg: TokenizeConfig, say, limit: int | None = None):
    """(TokenizedExamples, their labels (N,) float32 1/0) of KTO data, exact duplicates dropped."""
    fmt, examples = load_examples(path, "kto")
    if limit:
        examples = examples[:limit]
    examples, report = deduplicate(examples)
    if report["dropped"]:
        say(f"{path}: {report['dropped']} exact duplicates dropped")
    tokenized, lengths = tokenize_examples(examples, tokenizer, cfg)
    check_lengths(path, len(tokenized), lengths, cfg.max_length, say, "examples", "deduplication")
    labels = np.array([float(examples[ex.index].label) for ex in tokenized], np.float32)
    say(
        f"{path}: {len(tokenized)} labelled completions ({fmt}), "
        f"{int(labels.sum())} desirable, {int(len(labels) - labels.sum())} undesirable"
    )
    return tokenized, labels


def mismatched_rows(examples: list, seed: int, max_length: int | None) -> list:
    """For each example, its prompt followed by another example's completion (KTO's z0 pairs).

    The partner is fixed: a seeded permutation perm, and example perm[k] takes the completion
    of perm[k + 1] (cyclically), so no example is its own partner when there are two or more."""
    count = len(examples)
    perm = np.random.default_rng([seed, *b"kto"]).permutation(count)
    partner = np.empty(count, np.int64)
    partner[perm] = np.roll(perm, -1)
    rows = []
    for i, ex in enumerate(examples):
        other = examples[partner[i]]
        prompt = ex.input_ids[: ex.prompt_length]
        completion = other.input_ids[other.prompt_length :]
        ids = (prompt + completion)[:max_length] if max_length else prompt + completion
        mask = ([0] * len(prompt) + [1] * len(completion))[: len(ids)]
        rows.append(TokenizedExample(ids, mask, len(prompt), i))
    return rows


# ---- the loop ----


class KTO(PreferenceAlgorithm):
    def __init__(self, session: Session, cfg: DPOConfig):
        self.eval_rows = []  # held-out labelled completions: load_eval's when there are no pairs
        super().__init__(session, cfg)
        self.loss_fn = partial(kto_loss, cfg=cfg)  # built once: MLX caches its compiled step
        self.pair_ranking_fn = partial(pair_ranking, cfg=cfg)

    def load_train(self, data: str, tokenize: TokenizeConfig) -> list:
        cfg, session = self.cfg, self.session
        self.train_rows, self.train_labels = load_unpaired(
            data, session.info.tokenizer, tokenize, session.say
        )
        self.train_kl_rows = mismatched_rows(self.train_rows, cfg.seed, cfg.max_length)
        self.check_balance()
        return self.train_rows

    def load_eval(self, eval_data: str, tokenize: TokenizeConfig, limit: int | None) -> None:
        """Preference pairs when the file has them (the implicit reward ranks chosen over
        rejected), else labelled completions, scored by KTO's loss."""
        try:
            super().load_eval(eval_data, tokenize, limit)
        except UserError:
            session = self.session
            self.eval_rows, self.eval_labels = load_unpaired(
                eval_data, session.info.tokenizer, tokenize, session.say, limit=limit
            )
            self.eval_kl_rows = mismatched_rows(self.eval_rows, self.cfg.seed, self.cfg.max_length)

    def check_balance(self) -> None:
        """Ethayarajh et al. advise lambda_D n_D / (lambda_U n_U) in [1, 4/3]."""
        cfg, labels = self.cfg, self.train_labels
        desirable, undesirable = float(labels.sum()), float(len(labels) - labels.sum())
        if not desirable or not undesirable:
            self.session.say("KTO: the data has only one label; the reference point still applies")
            return
        ratio = cfg.desirable_weight * desirable / (cfg.undesirable_weight * undesirable)
        if not 1.0 <= ratio <= 4.0 / 3.0 + 1e-9:
            self.session.say(
                f"KTO: lambda_D n_D / (lambda_U n_U) = {ratio:.3g}; the paper advises 1 to 4/3 "
                "(set --desirable-weight / --undesirable-weight)"
            )

    def precompute_data(self, logps) -> None:
        self.ref_train = logps(self.train_rows, "reference logprobs")
        self.ref_train_kl = logps(self.train_kl_rows, "reference logprobs (z0 pairs)")
        if self.eval_rows:
            self.ref_eval = logps(self.eval_rows, "held-out reference")
            self.ref_eval_kl = logps(self.eval_kl_rows, "held-out reference (z0 pairs)")

    # ---- batches ----

    def labelled_batch(self, indices, rows, kl_rows, labels, ref=None, ref_kl=None):
        """Rows `indices` of labelled completions then their mismatched pairs, with labels
        and, when precomputed, reference logprobs (see kto_loss)."""
        pad = self.session.info.pad_id
        batch = collate([rows[i] for i in indices] + [kl_rows[i] for i in indices], pad)
        batch["label"] = labels[indices]
        if self.cfg.reference_mode == "precompute":
            batch["ref_logps"] = np.concatenate([ref[indices], ref_kl[indices]])
        return batch

    def batch(self, indices) -> dict[str, np.ndarray]:
        precomputed = self.cfg.reference_mode == "precompute"
        return self.labelled_batch(
            indices,
            self.train_rows,
            self.train_kl_rows,
            self.train_labels,
            self.ref_train if precomputed else None,
            self.ref_train_kl if precomputed else None,
        )

    # ---- evaluation ----

    def held_out(self) -> dict[str, float]:
        if self.eval_pairs:
            return self.evaluate_pairs(self.pair_ranking_fn)[1]
        if self.eval_rows:
            return self.evaluate_unpaired()
        return {}

    def evaluate_unpaired(self) -> dict[str, float]:
        """KTO's loss and rewards on held-out labelled completions."""
        session, cfg = self.session, self.cfg
        precomputed = cfg.reference_mode == "precompute"
        order = np.arange(len(self.eval_rows))
        totals: dict[str, float] = {}
        for start in range(0, len(order), cfg.eval_batch_size):
            indices = order[start : start + cfg.eval_batch_size]
            batch = self.labelled_batch(
                indices,
                self.eval_rows,
                self.eval_kl_rows,
                self.eval_labels,
                self.ref_eval if precomputed else None,
                self.ref_eval_kl if precomputed else None,
            )
            loss, metrics = session.backend.compute_loss(session.model, self.loss_fn, batch)
            for key, value in {"loss": loss, **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value) * len(indices)
        return {f"eval_{key}": value / len(order) for key, value in totals.items()}
