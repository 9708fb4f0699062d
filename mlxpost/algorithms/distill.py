"""Reasoning distillation: SFT on teacher traces, or logit distillation from a teacher.

Without --teacher this is SFT on conversational traces whose assistant turns
reason inside <think>...</think> (the OpenThoughts recipe). With --teacher (a
checkpoint sharing the student's tokenizer), the student matches the
teacher's next-token distributions on the dataset's completion tokens:

    forward_kl: KL(teacher || student)   (Hinton et al., 2015; mass-covering)
    reverse_kl: KL(student || teacher)   (MiniLLM, Gu et al., 2024; mode-seeking)
    jsd:        beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q
                (generalised JSD of GKD, Agarwal et al., 2024)

optionally plus sft_weight * NLL of the data. Departures: the divergences are
taken on the dataset's sequences, not on student samples (GKD's on-policy
data), and are not multiplied by T^2 at temperature T.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from mlxpost.algorithms.sft import SFT, SFTConfig
from mlxpost.config import option
from mlxpost.errors import UserError
from mlxpost.functional import head_terms, masked_mean
from mlxpost.loop import Session
from mlxpost.tokenizer import load_tokenizer

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class DistillConfig(SFTConfig):
    teacher: str | None = option(
        None, "Teacher checkpoint (same tokenizer) for logit distillation; none: SFT on the traces."
    )
    divergence: str = option("forward_kl", "Logit-distillation divergence.", DIVERGENCES)
    jsd_beta: float = option(
        0.5, "Mixing coefficient of the generalised JSD, in (0, 1).", gt=0, lt=1
    )
    distill_temperature: float = option(
        1.0, "Temperature applied to both models' logits in the divergence.", gt=0
    )
    sft_weight: float = option(
        0.0, "Weight of the data's NLL added to the divergence (with --teacher).", ge=0
    )


# --divergence -> head_terms' divergence of the student against the teacher
HEAD_DIVERGENCE = {"forward_kl": "kl_from_other", "reverse_kl": "kl", "jsd": "jsd"}


def distill_loss(
    ops, forward, batch, divergence: str, beta: float, temperature: float, sft_weight: float
):
    ids, mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    terms = head_terms(
        ops,
        forward,
        ids,
        mask,
        other="teacher",
        divergence=HEAD_DIVERGENCE[divergence],
        beta=beta,
        divergence_temperature=temperature,
    )
    distance = masked_mean(ops, terms["divergence"], loss_mask)
    nll = -masked_mean(ops, terms["logprobs"], loss_mask)
    return distance + sft_weight * nll, {"divergence": distance, "nll": nll}


class Distill(SFT):
    command = "distill"
    report_reasoning = True

    def __init__(self, session: Session, cfg: DistillConfig):
        if cfg.teacher:
            check_same_tokenizer(session.cfg.model, cfg.teacher)
        super().__init__(session, cfg)  # the data, then the student
        if cfg.teacher:
            session.backend.attach_frozen(
                session.model, "teacher", session.backend.load_model(cfg.teacher, cfg.dtype)
            )

    def make_loss(self):
        cfg = self.cfg
        if not cfg.teacher:
            return super().make_loss()
        return partial(
            distill_loss,
            divergence=cfg.divergence,
            beta=cfg.jsd_beta,
            temperature=cfg.distill_temperature,
            sft_weight=cfg.sft_weight,
        )


def check_same_tokenizer(student: str, teacher: str) -> None:
    """Logit distillation compares distributions token by token: the vocabularies must match."""
    from mlxpost.model_dir import read_config

    read_config(teacher)
    if (
        load_tokenizer(student).tokenizer.get_vocab()
        != load_tokenizer(teacher).tokenizer.get_vocab()
    ):
        raise UserError(
            f"{teacher}: the teacher's tokenizer differs from the student's ({student}); logit distillation needs the same vocabulary"
        )
