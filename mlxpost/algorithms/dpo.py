"""Direct preference optimisation and its relatives: cDPO, IPO, hinge (SLiC), robust DPO, RPO.

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

With --nll-alpha alpha > 0, alpha times the chosen completions' per-token NLL is
added (RPO, Pang et al., 2024).

The reference (checkpoint or adapter off, precomputed or live logprobs) and the
held-out evaluations are preference.py's, shared with KTO (kto.py), which
`mlxpost dpo --loss kto` trains.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from mlxpost.algorithms.preference import (
    PAIR_LOSSES,
    DPOConfig,
    PreferenceAlgorithm,
    implicit_rewards,
    policy_and_reference,
)
from mlxpost.algorithms.preference_pairs import load_pairs
from mlxpost.algorithms.supervised import collate
from mlxpost.data import TokenizeConfig
from mlxpost.functional import masked_mean
from mlxpost.loop import Session

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
    h, metrics = implicit_rewards(
        ops, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta
    )
    return ops.mean(pair_losses(ops, h, loss, beta, label_smoothing)), metrics


def chosen_nll(ops, logprobs, loss_mask):
    """RPO's NLL term: the mean over pairs of the chosen completion's per-token NLL."""
    return -ops.mean(masked_mean(ops, logprobs, loss_mask, axis=1))


def averages_logprobs(loss: str) -> bool:
    """Whether h takes per-token mean logprobs (IPO) rather than sums."""
    return loss == "ipo"


def dpo_loss(ops, forward, batch, cfg: DPOConfig):
    """The configured paired loss of a batch of 2B rows, chosen then rejected (see DPO.batch).
    `ref_logps` (2B,) holds precomputed reference logprobs; in live mode they are computed."""
    token_lp, policy, ref = policy_and_reference(
        ops, forward, batch, cfg.reference_mode, averages_logprobs(cfg.loss)
    )
    rows = policy.shape[0] // 2
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
        nll = chosen_nll(ops, token_lp[:rows], batch["loss_mask"][:rows])
        value = value + cfg.nll_alpha * nll
        metrics["nll_chosen"] = nll
    return value, metrics


# ---- the loop ----


class DPO(PreferenceAlgorithm):
    def __init__(self, session: Session, cfg: DPOConfig):
        super().__init__(session, cfg)
        self.loss_fn = partial(dpo_loss, cfg=cfg)  # built once: MLX caches its compiled step

    @property
    def average(self) -> bool:
        return averages_logprobs(self.cfg.loss)

    def load_train(self, data: str, tokenize: TokenizeConfig) -> list:
        info = self.session.info
        self.train_pairs, _ = load_pairs(data, "dpo", info.tokenizer, tokenize, self.session.say)
        return self.train_pairs

    def precompute_data(self, logps) -> None:
        self.ref_chosen = logps([c for c, _ in self.train_pairs], "reference logprobs (chosen)")
        self.ref_rejected = logps([r for _, r in self.train_pairs], "reference logprobs (rejected)")

    def batch(self, indices) -> dict[str, np.ndarray]:
        pad = self.session.info.pad_id
        pairs = [self.train_pairs[i] for i in indices]
        batch = collate([c for c, _ in pairs] + [r for _, r in pairs], pad)
        if self.cfg.reference_mode == "precompute":
            batch["ref_logps"] = np.concatenate(
                [self.ref_chosen[indices], self.ref_rejected[indices]]
            )
        return batch

    def held_out(self) -> dict[str, float]:
        if not self.eval_pairs:
            return {}
        loss, figures = self.evaluate_pairs(self.loss_fn)
        return {"eval_loss": loss, **figures}
