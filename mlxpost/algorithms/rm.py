"""Reward modelling: a scalar head on the LM trunk, trained on preference pairs.

The reward r(x, y) is the scalar head (mlxpost/backend_shared/heads.py) read at the last
non-padding token of prompt + completion. The loss is Bradley-Terry's
negative log-likelihood (Ouyang et al., 2022, eq. 1), with the optional
per-pair `margin` column subtracted inside the sigmoid (Llama 2, Touvron et
al., 2023):

    -log sigmoid(r_chosen - r_rejected - margin)

plus, with --centring-coef eta > 0, the auxiliary centring term of Eisenstein
et al. (2023), eta * mean((r_chosen + r_rejected)^2), which pins the reward's
free offset near 0 without changing which completion is preferred.

By default a LoRA adapter and the head are trained (--full: every weight and
the head). final/ holds trainable.npz (adapter or all weights, and the head),
the PEFT adapter with --lora, and reward_model.json naming the base model, so
mlxpost.reward_model.load_reward_model can score text later (`mlxpost eval
--task reward`, RL rewards).

Loading pairs, stacking chosen over rejected and the step are
mlxpost/algorithms/preference_pairs.py's, shared with DPO and KTO.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial

import numpy as np

from mlxpost import assets
from mlxpost.algorithms.preference_pairs import collate_pairs, held_out_pairs, load_pairs, pair_step
from mlxpost.algorithms.supervised import Batches
from mlxpost.config import TrainConfig, option
from mlxpost.data import TokenizeConfig
from mlxpost.loop import Algorithm, Session
from mlxpost.reward_model import REWARD_MODEL_FILE


@dataclass
class RMConfig(TrainConfig):
    learning_rate: float = option(
        1e-3, "Peak learning rate (AdamW); LoRA on small models wants a high one."
    )
    steps: int = option(
        300, "Optimizer steps (300 of 16 pairs: about one epoch of the bundled pairs)."
    )
    centring_coef: float = option(
        0.0,
        "Weight of the reward-centring term mean((r_chosen + r_rejected)^2) (Eisenstein et al., "
        "2023, use 0.01); 0: off.",
        ge=0,
    )
    on_too_long: str = option(
        "drop",
        "Pairs with a side over --max-length: drop them or truncate the completions.",
        ("drop", "truncate"),
    )
    eval_limit: int = option(300, "Held-out pairs scored at each evaluation (0: all).", ge=0)
    eval_batch_size: int = option(16, "Pairs per batch when evaluating.", ge=1)


# ---- the math ----


def pair_rewards(ops, forward, batch):
    """(r_chosen (B,), r_rejected (B,)): the scalar head at each row's last real token."""
    scores = forward.scores(batch["input_ids"], batch["attention_mask"])  # (2B, T)
    rewards = ops.take_along_axis(scores, batch["last_index"][:, None], axis=1)[:, 0]  # (2B,)
    pairs = batch["margin"].shape[0]
    return rewards[:pairs], rewards[pairs:]


def bradley_terry(ops, chosen, rejected, margin, centring_coef: float = 0.0):
    """(mean loss, metrics) of rewards (B,): -log sigmoid(r_c - r_r - margin), plus
    centring_coef * mean((r_c + r_r)^2)."""
    difference = chosen - rejected
    nll = -ops.mean(ops.log_sigmoid(difference - margin))
    loss = nll
    if centring_coef > 0:
        loss = nll + centring_coef * ops.mean(ops.square(chosen + rejected))
    # Each mean is taken once: mlx 0.32's compiled step fails (IndexError _Map_base::at) when
    # a metric repeats a reduction another metric also computes (mean(chosen) twice).
    reward_chosen, reward_rejected = ops.mean(chosen), ops.mean(rejected)
    metrics = {
        "bt_loss": nll,
        "accuracy": ops.mean(ops.where(difference > 0, 1.0, 0.0)),
        "margin": ops.mean(difference),
        "reward_mean": 0.5 * (reward_chosen + reward_rejected),
        "reward_chosen": reward_chosen,
        "reward_rejected": reward_rejected,
    }
    return loss, metrics


def rm_loss(ops, forward, batch, cfg: RMConfig):
    """Bradley-Terry loss (+ centring) of a stacked pair batch (see collate_pairs)."""
    chosen, rejected = pair_rewards(ops, forward, batch)
    return bradley_terry(ops, chosen, rejected, batch["margin"], cfg.centring_coef)


# ---- the loop ----


class RewardModel(Algorithm):
    command = "rm"

    def export(self, directory: str) -> None:
        """Every checkpoint (final/ included) is a loadable reward model."""
        write_reward_model_info(self.session, directory)

    def __init__(self, session: Session, cfg: RMConfig):
        self.session, self.cfg = session, cfg
        info = session.info
        data, eval_data = assets.training_data(self.command, cfg.data, cfg.eval_data)
        tokenize = TokenizeConfig(max_length=cfg.max_length, on_too_long=cfg.on_too_long)
        self.train_pairs, train_examples = load_pairs(
            data, self.command, info.tokenizer, tokenize, session.say
        )
        self.train_margins = np.array(
            [ex.margin or 0.0 for ex in train_examples], np.float32
        )  # a missing margin is 0: the plain Bradley-Terry loss
        self.eval_pairs, eval_examples = (
            load_pairs(
                eval_data,
                self.command,
                info.tokenizer,
                tokenize,
                session.say,
                limit=cfg.eval_limit,
            )
            if eval_data
            else ([], [])
        )
        self.eval_margins = np.array([ex.margin or 0.0 for ex in eval_examples], np.float32)
        self.batches = Batches(self.train_pairs, cfg.batch_size, cfg.seed, info.pad_id)
        self.loss_fn = partial(rm_loss, cfg=cfg)  # built once: MLX caches its compiled step

    def batch(self, indices, pairs, margins) -> dict[str, np.ndarray]:
        return collate_pairs(
            [pairs[i] for i in indices], self.session.info.pad_id, margins[indices]
        )

    def train_step(self, step: int) -> dict[str, float]:
        return pair_step(
            self.session,
            self.loss_fn,
            self.batches,
            step,
            lambda chunk: self.batch(chunk, self.train_pairs, self.train_margins),
        )

    def evaluate(self, step: int) -> dict[str, float]:
        if not self.eval_pairs:
            return {}
        figures = held_out_pairs(
            self.session.backend,
            self.session.model,
            self.loss_fn,
            self.eval_pairs,
            self.session.info.pad_id,
            self.cfg.eval_batch_size,
            self.eval_margins,
        )
        out = {"eval_loss": figures["loss"], "eval_accuracy": figures["accuracy"]}
        out.update(
            {
                f"eval_{key}": figures[key]
                for key in ("margin", "reward_mean", "reward_chosen", "reward_rejected")
            }
        )
        return out


def write_reward_model_info(session: Session, directory: str) -> None:
    """reward_model.json: what mlxpost.reward_model.load_reward_model needs."""
    cfg = session.cfg
    info = {
        "kind": "reward_model",
        "base_model": os.path.abspath(cfg.model),
        "lora": bool(cfg.lora),
        "max_length": cfg.max_length,
    }
    with open(os.path.join(directory, REWARD_MODEL_FILE), "w") as f:
        json.dump(info, f, indent=2)
