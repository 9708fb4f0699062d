"""Direct preference optimisation and its relatives: cDPO, IPO, hinge (SLiC), robust DPO, KTO.

Paired losses are functions of the log-ratio difference

    h = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))

with log pi(y|x) the sum of the completion's token logprobs:

    sigmoid  -(1 - eps) log sig(beta h) - eps log sig(-beta h)
             (DPO, Rafailov et al., 2023; eps > 0: conservative DPO, Mitchell, 2023)
    ipo      (h - 1 / (2 beta))^2                       (Azar et al., 2023)
    hinge    max(0, 1 - beta h)                         (SLiC-HF, Zhao et al., 2023)
    robust   (-(1 - eps) log sig(beta h) + eps log sig(-beta h)) / (1 - 2 eps)
             (Chowdhury et al., 2024: unbiased under a label-flip rate eps)

IPO takes h from per-token AVERAGED logprobs, as the IPO authors' reference
implementation and TRL do: its squared loss regresses h onto the fixed target
1/(2 beta), and a sum of log-ratios grows with the completion's length, so with
sums the same target would demand a far larger per-token shift of short pairs
than of long ones. The other losses use sums (their sigmoid/hinge saturate).

KTO (Ethayarajh et al., 2024) learns from unpaired completions labelled
desirable or not (paired data is split: chosen desirable, rejected not):

    r = log pi(y|x) - log ref(y|x),  z0 = max(0, mean_j [log pi(y'_j|x_j) - log ref(y'_j|x_j)])
    loss = lambda_D (1 - sig(beta (r - z0)))  for desirable y,
           lambda_U (1 - sig(beta (z0 - r)))  for undesirable y,  averaged over the batch.

z0, the paper's reference point (a batch estimate of KL(pi || ref)), is taken
on mismatched pairs: example j's prompt with another example's completion y'_j,
over the examples of each microbatch, and carries no gradient. As in TRL's KL
dataset, each example's partner is fixed once (a seeded derangement: example
perm[k] gets the completion of perm[k+1]), so the mismatched sequences' reference
logprobs can be precomputed like the others.

Reference logprobs: --reference-mode precompute (default) computes them once
before training, with the adapter switched off (or the --reference checkpoint;
with --full the base checkpoint) and keeps them in memory per example;
--reference-mode live recomputes them in every step's loss.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
from tqdm import tqdm

from mlxpost import assets
from mlxpost.algorithms.preference_pairs import held_out_pairs, load_pairs, pair_step
from mlxpost.algorithms.supervised import Batches, check_lengths, collate
from mlxpost.backend import adapter_disabled
from mlxpost.config import TrainConfig, option
from mlxpost.data import (
    TokenizeConfig,
    TokenizedExample,
    deduplicate,
    load_examples,
    tokenize_examples,
)
from mlxpost.errors import UserError
from mlxpost.evaluation import HeldOutMath, eval_math_data_option, eval_math_option
from mlxpost.functional import masked_mean, masked_sum, token_logprobs
from mlxpost.loop import Algorithm, Session

PAIR_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
LOSSES = PAIR_LOSSES + ("kto",)


@dataclass
class DPOConfig(TrainConfig):
    loss: str = option(
        "sigmoid",
        "sigmoid (DPO; cDPO with --label-smoothing), ipo, hinge (SLiC), robust (Chowdhury et "
        "al.), or kto (unpaired labels; paired data is split into chosen/rejected).",
        LOSSES,
    )
    beta: float = option(
        0.1, "Strength of the implicit KL to the reference (IPO: 1/(2 beta) target).", gt=0
    )
    label_smoothing: float = option(
        0.0,
        "Assumed share of flipped labels eps for sigmoid (cDPO) and robust, in [0, 0.5).",
        ge=0,
        lt=0.5,
    )
    nll_alpha: float = option(
        0.0,
        "Add alpha * the chosen completions' per-token NLL to the paired losses (RPO, Pang et al., 2024): keeps DPO from lowering the chosen likelihood.",
        ge=0,
    )
    desirable_weight: float = option(1.0, "KTO weight lambda_D of desirable completions.", ge=0)
    undesirable_weight: float = option(1.0, "KTO weight lambda_U of undesirable completions.", ge=0)
    reference_mode: str = option(
        "precompute",
        "precompute: reference logprobs once before training, kept in memory; live: every step.",
        ("precompute", "live"),
    )
    reference: str | None = option(
        None,
        "Reference checkpoint; default: the base model with the adapter off (with --full: the base checkpoint).",
    )
    on_too_long: str = option(
        "drop",
        "Examples over --max-length: drop them or truncate the completions.",
        ("drop", "truncate"),
    )
    eval_limit: int = option(
        300, "Held-out pairs (KTO: examples) at each evaluation (0: all).", ge=0
    )
    eval_batch_size: int = option(16, "Pairs per batch when evaluating.", ge=1)
    eval_math: int = eval_math_option(0)
    eval_math_data: str | None = eval_math_data_option()
    eval_reward_model: str | None = option(
        None,
        "Reward model (final/ of `mlxpost rm`) scoring greedy generations on held-out prompts at each evaluation.",
    )
    eval_reward_prompts: int = option(
        32, "Held-out prompts generated from for --eval-reward-model.", ge=1
    )
    eval_max_new_tokens: int = option(128, "Tokens generated per answer during evaluation.", ge=1)

    def __post_init__(self):
        super().__post_init__()
        if self.nll_alpha and self.loss == "kto":
            raise UserError("--nll-alpha applies to paired losses, not kto")


# ---- the math: pure functions of sequence logprobs ----


def pair_losses(ops, h, loss: str, beta: float, label_smoothing: float = 0.0):
    """Per-pair losses (B,) of the log-ratio differences h (B,)."""
    eps = label_smoothing
    if loss == "sigmoid":
        return -(1.0 - eps) * ops.log_sigmoid(beta * h) - eps * ops.log_sigmoid(-beta * h)
    if loss == "ipo":
        return ops.square(h - 1.0 / (2.0 * beta))
    if loss == "hinge":
        return ops.maximum(1.0 - beta * h, 0.0)
    if loss == "robust":
        return (-(1.0 - eps) * ops.log_sigmoid(beta * h) + eps * ops.log_sigmoid(-beta * h)) / (
            1.0 - 2.0 * eps
        )
    raise ValueError(f"unknown pairwise loss {loss!r}; choose one of {', '.join(PAIR_LOSSES)}")


def preference_objective(
    ops, policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss, beta, label_smoothing=0.0
):
    """(mean loss, metrics) of sequence logprobs (B,) of chosen and rejected completions."""
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    h = chosen - rejected
    value = ops.mean(pair_losses(ops, h, loss, beta, label_smoothing))
    metrics = {
        "accuracy": ops.mean(ops.where(h > 0, 1.0, 0.0)),
        "reward_margin": ops.mean(beta * h),
        "reward_chosen": ops.mean(beta * chosen),
        "reward_rejected": ops.mean(beta * rejected),
        "logp_chosen": ops.mean(policy_chosen),
        "logp_rejected": ops.mean(policy_rejected),
    }
    return value, metrics


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


def sequence_logprobs(ops, logits, input_ids, loss_mask, average: bool = False):
    """(B,) sum (or per-token mean) of the completion tokens' logprobs."""
    return reduce_logprobs(ops, token_logprobs(ops, logits, input_ids), loss_mask, average)


def reduce_logprobs(ops, logprobs, loss_mask, average: bool):
    if average:
        return masked_mean(ops, logprobs, loss_mask, axis=1)
    return masked_sum(ops, logprobs, loss_mask, axis=1)


def chosen_nll(ops, logprobs, loss_mask):
    """RPO's NLL term: the mean over pairs of the chosen completion's per-token NLL."""
    return -ops.mean(masked_mean(ops, logprobs, loss_mask, axis=1))


def dpo_loss(ops, forward, batch, cfg: DPOConfig):
    """The configured loss of a batch of 2B rows (see DPO.batch): chosen then rejected (paired
    losses), or B labelled completions then their B mismatched pairs (KTO, with `label`).
    `ref_logps` (2B,) holds precomputed reference logprobs; in live mode they are computed."""
    ids, mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    average = cfg.loss == "ipo"
    token_lp = token_logprobs(ops, forward.logits(ids, mask), ids)
    policy = reduce_logprobs(ops, token_lp, loss_mask, average)
    if cfg.reference_mode == "live":
        frozen = forward.frozen_logits("reference", ids, mask)
        ref = ops.stop_gradient(sequence_logprobs(ops, frozen, ids, loss_mask, average))
    else:
        ref = batch["ref_logps"]
    rows = policy.shape[0] // 2
    if cfg.loss == "kto":
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
    value, metrics = preference_objective(
        ops,
        policy[:rows],
        policy[rows:],
        ref[:rows],
        ref[rows:],
        cfg.loss,
        cfg.beta,
        cfg.label_smoothing,
    )
    if cfg.nll_alpha > 0:
        nll = chosen_nll(ops, token_lp[:rows], loss_mask[:rows])
        value = value + cfg.nll_alpha * nll
        metrics["nll_chosen"] = nll
    return value, metrics


# ---- unpaired data (KTO) ----


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


# ---- reference logprobs ----


def reference_logprobs(
    backend, model, reference, rows, pad_id: int, average: bool, batch_size: int = 32, desc=""
) -> np.ndarray:
    """(N,) sequence logprobs of TokenizedExamples under the reference: `reference` if given,
    else `model` with its adapter switched off. Batched by length, no gradients."""
    out = np.zeros(len(rows), np.float32)
    order = np.argsort([len(r.input_ids) for r in rows], kind="stable")
    with tqdm(total=len(rows), desc=desc, unit="seq", file=sys.stderr, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = collate([rows[i] for i in chunk], pad_id)
            if reference is not None:
                logprobs = backend.logprobs(reference, batch["input_ids"], batch["attention_mask"])
            else:
                with adapter_disabled(backend, model):
                    logprobs = backend.logprobs(model, batch["input_ids"], batch["attention_mask"])
            mask = batch["loss_mask"]
            sums = (logprobs * mask).sum(axis=1, dtype=np.float32)
            out[chunk] = sums / np.maximum(mask.sum(axis=1), 1.0) if average else sums
            bar.update(len(chunk))
    return out


# ---- the loop ----


class DPO(Algorithm):
    command = "dpo"

    def __init__(self, session: Session, cfg: DPOConfig):
        self.session, self.cfg = session, cfg
        info = session.info  # the data first: bad data fails before the model loads
        self.kto = cfg.loss == "kto"
        data = cfg.data or assets.default_data(self.command)
        eval_data = cfg.eval_data or (
            assets.default_data(f"{self.command}-eval") if not cfg.data else None
        )
        tokenize = TokenizeConfig(max_length=cfg.max_length, on_too_long=cfg.on_too_long)
        say = session.say
        if self.kto:
            self.train_rows, self.train_labels = load_unpaired(data, info.tokenizer, tokenize, say)
            self.train_kl_rows = mismatched_rows(self.train_rows, cfg.seed, cfg.max_length)
            self.check_kto_balance()
            items = self.train_rows
        else:
            self.train_pairs, _ = load_pairs(data, "dpo", info.tokenizer, tokenize, say)
            items = self.train_pairs
        self.batches = Batches(items, cfg.batch_size, cfg.seed, info.pad_id)

        # Held-out data: preference pairs when the file has them (every loss, KTO too: the
        # implicit reward ranks chosen over rejected), else labelled completions (KTO only).
        self.eval_pairs, self.eval_prompts, self.eval_rows = [], [], []
        if eval_data:
            limit = cfg.eval_limit or None
            try:
                self.eval_pairs, eval_examples = load_pairs(
                    eval_data, "dpo", info.tokenizer, tokenize, say, limit=limit
                )
                self.eval_prompts = [ex.prompt_messages for ex in eval_examples]
            except UserError:
                if not self.kto:
                    raise
                self.eval_rows, self.eval_labels = load_unpaired(
                    eval_data, info.tokenizer, tokenize, say, limit=limit
                )
                self.eval_kl_rows = mismatched_rows(self.eval_rows, cfg.seed, cfg.max_length)

        # The reference: a separate checkpoint, the base checkpoint (--full), or the adapter off.
        backend, model = session.backend, session.model
        reference = None
        if cfg.reference:
            reference = backend.load_model(cfg.reference, cfg.dtype)
        elif not cfg.lora:
            reference = backend.load_model(cfg.model, cfg.dtype)
        if cfg.reference_mode == "live":
            if reference is not None:
                backend.attach_frozen(model, "reference", reference)
        else:
            self.precompute(reference)
        del reference  # precompute: no longer needed

        self.loss_fn = partial(dpo_loss, cfg=cfg)  # built once: MLX caches its compiled step
        # Pairs are always ranked by the summed-logprob implicit reward, as DPO and KTO define it.
        eval_cfg = replace(cfg, loss="sigmoid") if self.kto else cfg
        self.pair_eval_fn = partial(dpo_loss, cfg=eval_cfg)
        self.math = HeldOutMath(cfg, cfg.eval_max_new_tokens)
        self.scorer = None
        if cfg.eval_reward_model:
            from mlxpost.reward_model import RewardModelScorer

            if not self.eval_prompts:
                raise UserError("--eval-reward-model needs held-out preference data (--eval-data)")
            self.scorer = RewardModelScorer(backend, cfg.eval_reward_model, cfg.dtype)

    def check_kto_balance(self) -> None:
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

    def precompute(self, reference) -> None:
        session, cfg = self.session, self.cfg
        backend, model, pad = session.backend, session.model, session.info.pad_id
        average = cfg.loss == "ipo"

        def logps(rows, desc):
            return reference_logprobs(backend, model, reference, rows, pad, average, desc=desc)

        if self.kto:
            self.ref_train = logps(self.train_rows, "reference logprobs")
            self.ref_train_kl = logps(self.train_kl_rows, "reference logprobs (z0 pairs)")
        else:
            self.ref_chosen = logps([c for c, _ in self.train_pairs], "reference logprobs (chosen)")
            self.ref_rejected = logps(
                [r for _, r in self.train_pairs], "reference logprobs (rejected)"
            )
        if self.eval_pairs:
            self.ref_eval_chosen = logps([c for c, _ in self.eval_pairs], "held-out reference")
            self.ref_eval_rejected = logps([r for _, r in self.eval_pairs], "held-out reference")
        if self.eval_rows:
            self.ref_eval = logps(self.eval_rows, "held-out reference")
            self.ref_eval_kl = logps(self.eval_kl_rows, "held-out reference (z0 pairs)")
        session.say("reference logprobs precomputed")

    # ---- batches ----

    def pair_batch(self, indices) -> dict[str, np.ndarray]:
        pad = self.session.info.pad_id
        pairs = [self.train_pairs[i] for i in indices]
        batch = collate([c for c, _ in pairs] + [r for _, r in pairs], pad)
        if self.cfg.reference_mode == "precompute":
            batch["ref_logps"] = np.concatenate(
                [self.ref_chosen[indices], self.ref_rejected[indices]]
            )
        return batch

    def kto_batch(self, indices, rows, kl_rows, labels, ref=None, ref_kl=None):
        pad = self.session.info.pad_id
        batch = collate([rows[i] for i in indices] + [kl_rows[i] for i in indices], pad)
        batch["label"] = labels[indices]
        if self.cfg.reference_mode == "precompute":
            batch["ref_logps"] = np.concatenate([ref[indices], ref_kl[indices]])
        return batch

    def batch(self, indices) -> dict[str, np.ndarray]:
        if self.kto:
            precomputed = self.cfg.reference_mode == "precompute"
            return self.kto_batch(
                indices,
                self.train_rows,
                self.train_kl_rows,
                self.train_labels,
                self.ref_train if precomputed else None,
                self.ref_train_kl if precomputed else None,
            )
        return self.pair_batch(indices)

    def train_step(self, step: int) -> dict[str, float]:
        return pair_step(self.session, self.loss_fn, self.batches, step, self.batch)

    # ---- evaluation ----

    def evaluate(self, step: int) -> dict[str, float]:
        session, cfg = self.session, self.cfg
        backend, model, pad = session.backend, session.model, session.info.pad_id
        precomputed = cfg.reference_mode == "precompute"
        out: dict[str, float] = {}
        if self.eval_pairs:

            def extra(indices):
                if not precomputed:
                    return {}
                return {
                    "ref_logps": np.concatenate(
                        [self.ref_eval_chosen[indices], self.ref_eval_rejected[indices]]
                    )
                }

            figures = held_out_pairs(
                backend,
                model,
                self.pair_eval_fn,
                self.eval_pairs,
                pad,
                cfg.eval_batch_size,
                extra=extra,
            )
            if not self.kto:
                out["eval_loss"] = figures["loss"]
            out["eval_accuracy"] = figures["accuracy"]
            for key in ("reward_margin", "reward_chosen", "reward_rejected"):
                out[f"eval_{key}"] = figures[key]
        if self.eval_rows:
            out.update(self.evaluate_unpaired())
        if self.math:
            report = self.math.evaluate(backend, model, session.info)
            out["math_accuracy"] = report["accuracy"]
        if self.scorer is not None:
            from mlxpost.evaluation import RewardEvalConfig, score_generations

            report = score_generations(
                backend,
                model,
                session.info,
                self.eval_prompts[: cfg.eval_reward_prompts],
                self.scorer,
                RewardEvalConfig(
                    reward_model=cfg.eval_reward_model, max_new_tokens=cfg.eval_max_new_tokens
                ),
            )
            out["eval_rm_score"] = report["mean_score"]
            out["eval_completion_length"] = report["mean_completion_tokens"]
        return out

    def evaluate_unpaired(self) -> dict[str, float]:
        """KTO's loss and rewards on held-out labelled completions."""
        session, cfg = self.session, self.cfg
        precomputed = cfg.reference_mode == "precompute"
        order = np.arange(len(self.eval_rows))
        totals: dict[str, float] = {}
        for start in range(0, len(order), cfg.eval_batch_size):
            indices = order[start : start + cfg.eval_batch_size]
            batch = self.kto_batch(
                indices,
                self.eval_rows,
                self.eval_kl_rows,
                self.eval_labels,
                self.ref_eval if precomputed else None,
                self.ref_eval_kl if precomputed else None,
            )
            loss, metrics = session.backend.evaluate(session.model, self.loss_fn, batch)
            for key, value in {"loss": loss, **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value) * len(indices)
        return {f"eval_{key}": value / len(order) for key, value in totals.items()}
