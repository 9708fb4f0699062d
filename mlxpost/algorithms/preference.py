"""What DPO (dpo.py) and KTO (kto.py) share: a policy trained against a frozen reference.

Both score a completion y of prompt x by its log-ratio to the reference,

    log pi(y|x) - log ref(y|x),

with log pi(y|x) the sum of the completion's token logprobs (IPO: their mean),
and beta times it is the implicit reward (Rafailov et al., 2023, eq. 5, less
beta log Z(x), which cancels between two completions of one prompt; KTO's
r_theta, Ethayarajh et al., 2024, is the log-ratio itself).

The reference is a separate --reference checkpoint, the base checkpoint
(--full), or the trained model with its adapter switched off. Its logprobs are
computed once before training and kept in memory per sequence (--reference-mode
precompute, the default), or recomputed in every step's loss (live).

Evaluations rank held-out preference pairs by the implicit reward (accuracy,
mean rewards of chosen and rejected, their margin) and, optionally, report
greedy math accuracy (--eval-math) and a reward model's mean score of greedy
generations on the held-out prompts (--eval-reward-model).

Both run as `mlxpost dpo` (--loss kto: KTO), so DPOConfig holds the options of both.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from mlxpost import assets
from mlxpost.algorithms.preference_pairs import held_out_pairs, load_pairs, pair_step
from mlxpost.algorithms.supervised import Batches, collate
from mlxpost.backend import adapter_disabled
from mlxpost.config import TrainConfig, option
from mlxpost.data import TokenizeConfig
from mlxpost.distributed import computed_in_shares, is_main_process
from mlxpost.errors import UserError
from mlxpost.evaluation import HeldOutMath, eval_math_data_option, eval_math_option
from mlxpost.functional import head_terms, masked_mean, masked_sum
from mlxpost.loop import Algorithm, Session

PAIR_LOSSES = ("sigmoid", "ipo", "hinge", "robust")  # DPO's (dpo.py)
LOSSES = PAIR_LOSSES + ("kto",)  # kto: KTO (kto.py)


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


# ---- the math: sequence logprobs against the reference ----


def reduce_logprobs(ops, logprobs, loss_mask, average: bool):
    if average:
        return masked_mean(ops, logprobs, loss_mask, axis=1)
    return masked_sum(ops, logprobs, loss_mask, axis=1)


def policy_and_reference(ops, forward, batch, reference_mode: str, average: bool):
    """(token logprobs (N, T), policy (N,), reference (N,)) of a batch's N rows: the token
    logprobs and sequence logprobs under the policy, and the reference's sequence logprobs,
    `ref_logps` (N,) when precomputed, else computed now (live) and without gradient."""
    ids, mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    token_lp = head_terms(ops, forward, ids, mask)["logprobs"]
    policy = reduce_logprobs(ops, token_lp, loss_mask, average)
    if reference_mode == "live":
        frozen = head_terms(ops, forward, ids, mask, role="reference")["logprobs"]
        ref = ops.stop_gradient(reduce_logprobs(ops, frozen, loss_mask, average))
    else:
        ref = batch["ref_logps"]
    return token_lp, policy, ref


def implicit_rewards(ops, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """(h (B,), metrics) of sequence logprobs (B,) of chosen and rejected completions:
    h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)), and the preference
    accuracy (h > 0) and mean implicit rewards it implies."""
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    h = chosen - rejected
    metrics = {
        "accuracy": ops.mean(ops.where(h > 0, 1.0, 0.0)),
        "reward_margin": ops.mean(beta * h),
        "reward_chosen": ops.mean(beta * chosen),
        "reward_rejected": ops.mean(beta * rejected),
        "logp_chosen": ops.mean(policy_chosen),
        "logp_rejected": ops.mean(policy_rejected),
    }
    return h, metrics


# ---- reference logprobs ----


def reference_logprobs(
    backend, model, reference, rows, pad_id: int, average: bool, batch_size: int = 32, desc=""
) -> np.ndarray:
    """(N,) sequence logprobs of TokenizedExamples under the reference: `reference` if given,
    else `model` with its adapter switched off. Batched by length, no gradients."""
    out = np.zeros(len(rows), np.float32)
    order = np.argsort([len(r.input_ids) for r in rows], kind="stable")
    with tqdm(
        total=len(rows),
        desc=desc,
        unit="seq",
        file=sys.stderr,
        leave=False,
        disable=not is_main_process(),  # one bar for a data-parallel run: rank 0's share
    ) as bar:
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


class PreferenceAlgorithm(Algorithm):
    """The loop DPO and KTO share. A subclass loads its training data (`load_train`, returning
    the items batches draw from), precomputes their reference logprobs (`precompute_data`),
    builds a step's batch (`batch`), reports its held-out figures (`held_out`) and, after
    this __init__, sets `loss_fn`: its loss with the config bound."""

    command = "dpo"
    average = False  # sequence logprobs are sums; IPO's are per-token means (dpo.py)

    def __init__(self, session: Session, cfg: DPOConfig):
        self.session, self.cfg = session, cfg
        info = session.info  # the data first: bad data fails before the model loads
        data, eval_data = assets.training_data(self.command, cfg.data, cfg.eval_data)
        tokenize = TokenizeConfig(max_length=cfg.max_length, on_too_long=cfg.on_too_long)
        items = self.load_train(data, tokenize)
        self.batches = Batches(items, cfg.batch_size, cfg.seed, info.pad_id)
        self.eval_pairs, self.eval_prompts = [], []
        if eval_data:
            self.load_eval(eval_data, tokenize, cfg.eval_limit or None)

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

        self.math = HeldOutMath(cfg, cfg.eval_max_new_tokens)
        self.scorer = None
        if cfg.eval_reward_model:
            from mlxpost.reward_model import RewardModelScorer

            if not self.eval_prompts:
                raise UserError("--eval-reward-model needs held-out preference data (--eval-data)")
            self.scorer = RewardModelScorer(backend, cfg.eval_reward_model, cfg.dtype)

    def load_train(self, data: str, tokenize: TokenizeConfig) -> list:
        raise NotImplementedError

    def load_eval(self, eval_data: str, tokenize: TokenizeConfig, limit: int | None) -> None:
        """Held-out preference pairs, and their prompts for --eval-reward-model."""
        info, say = self.session.info, self.session.say
        self.eval_pairs, eval_examples = load_pairs(
            eval_data, "dpo", info.tokenizer, tokenize, say, limit=limit
        )
        self.eval_prompts = [ex.prompt_messages for ex in eval_examples]

    def precompute(self, reference) -> None:
        session = self.session
        backend, model, pad = session.backend, session.model, session.info.pad_id

        def logps(rows, desc):
            def share(indices):
                chosen = [rows[i] for i in indices]
                return reference_logprobs(
                    backend, model, reference, chosen, pad, self.average, desc=desc
                )

            # in a data-parallel run each rank computes a share (mlxpost.distributed)
            return computed_in_shares(len(rows), share).astype(np.float32)

        self.precompute_data(logps)
        if self.eval_pairs:
            self.ref_eval_chosen = logps([c for c, _ in self.eval_pairs], "held-out reference")
            self.ref_eval_rejected = logps([r for _, r in self.eval_pairs], "held-out reference")
        session.say("reference logprobs precomputed")

    def precompute_data(self, logps) -> None:
        """Reference logprobs of the subclass's own sequences; logps(rows, desc) -> (N,)."""
        raise NotImplementedError

    def batch(self, indices) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def train_step(self, step: int) -> dict[str, float]:
        return pair_step(self.session, self.loss_fn, self.batches, step, self.batch)

    # ---- evaluation ----

    def evaluate(self, step: int) -> dict[str, float]:
        session, cfg = self.session, self.cfg
        backend, model = session.backend, session.model
        out = self.held_out()
        if self.math:
            report = self.math.score(backend, model, session.info)
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

    def held_out(self) -> dict[str, float]:
        """The subclass's figures on its held-out data."""
        raise NotImplementedError

    def evaluate_pairs(self, loss_fn) -> tuple[float, dict[str, float]]:
        """(mean loss, figures) of loss_fn over the held-out pairs: preference accuracy and
        mean implicit rewards (see implicit_rewards), as eval_* figures."""
        session, cfg = self.session, self.cfg
        precomputed = cfg.reference_mode == "precompute"

        def extra(indices):
            if not precomputed:
                return {}
            return {
                "ref_logps": np.concatenate(
                    [self.ref_eval_chosen[indices], self.ref_eval_rejected[indices]]
                )
            }

        figures = held_out_pairs(
            session.backend,
            session.model,
            loss_fn,
            self.eval_pairs,
            session.info.pad_id,
            cfg.eval_batch_size,
            extra=extra,
        )
        keys = ("accuracy", "reward_margin", "reward_chosen", "reward_rejected")
        return figures["loss"], {f"eval_{key}": figures[key] for key in keys}
