"""Supervised fine-tuning, optionally with a KL penalty towards the reference model.

loss = NLL(completion tokens) + kl_beta * KL(policy || reference), the KL taken
exactly over the vocabulary at each completion token. With kl_beta > 0 this is
the SFT-with-KL objective of InstructGPT (Ouyang et al., 2022, eq. 2 without the
RL term): the reference is the base model with the adapter switched off, or a
checkpoint given with --reference. Template randomisation (--template random)
gives instruction tuning over several prompt formats.

Continued pre-training: plain texts longer than --max-length are cut into
blocks (--on-too-long split, the default), and --packing puts several short
examples in each row, each attending only to itself (mlxpost.data.tokenize).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

from mlxpost import assets
from mlxpost.algorithms.supervised import (
    Batches,
    held_out,
    load_tokenized,
    nll_and_kl_loss,
)
from mlxpost.batching import split_batch
from mlxpost.config import TrainConfig, option
from mlxpost.data import TokenizeConfig
from mlxpost.distributed import rank_seed
from mlxpost.evaluation import HeldOutMath, eval_math_data_option, eval_math_option
from mlxpost.loop import Algorithm, Session


@dataclass
class SFTConfig(TrainConfig):
    learning_rate: float = option(
        1e-3, "Peak learning rate (AdamW); LoRA on small models wants a high one."
    )
    completion_only: bool = option(
        True,
        "Loss on completion tokens only (--completion-only) or on every token (--all-tokens).",
        flag="--completion-only/--all-tokens",
    )
    template: str = option(
        "fixed",
        "fixed: the tokenizer's chat template; random: a prompt format drawn per example (instruction tuning).",
        ("fixed", "random"),
    )
    on_too_long: str = option(
        "split",
        "Examples over --max-length. split: cut plain text into --max-length blocks, each an example (conversations are dropped); drop: skip them; truncate: cut the completion's or text's end.",
        ("split", "drop", "truncate"),
    )
    packing: bool = option(
        False,
        "Pack short examples into rows of up to --max-length tokens (attention and positions stay within each example); --batch-size then counts rows.",
    )
    kl_beta: float = option(
        0.0,
        "Weight of KL(policy || reference) added to the loss (InstructGPT-style); 0: off.",
        ge=0,
    )
    reference: str | None = option(
        None,
        "Reference checkpoint for the KL; default: the base model with the adapter off (with --full: the base checkpoint).",
    )
    eval_limit: int = option(200, "Held-out examples for the held-out loss.", ge=1)
    eval_math: int = eval_math_option(100)
    eval_math_data: str | None = eval_math_data_option()
    eval_text: int = option(
        100, "General-text passages whose perplexity is measured at each evaluation (0: off).", ge=0
    )
    eval_max_new_tokens: int = option(
        192, "Tokens generated per math answer during evaluation.", ge=1
    )


class SFT(Algorithm):
    command = "sft"
    report_reasoning = False  # distillation also tracks how long the model reasons

    def __init__(self, session: Session, cfg: SFTConfig):
        self.session, self.cfg = session, cfg
        info = session.info  # the data first: bad data fails before the model loads
        data, eval_data = assets.training_data(self.command, cfg.data, cfg.eval_data)
        tokenize = TokenizeConfig(
            max_length=cfg.max_length,
            on_too_long=cfg.on_too_long,
            template=cfg.template,
            completion_only=cfg.completion_only,
            seed=cfg.seed,
        )
        self.train_examples = load_tokenized(
            data, self.command, info.tokenizer, tokenize, session.say
        )
        self.eval_examples = (
            load_tokenized(
                eval_data, self.command, info.tokenizer, tokenize, session.say, limit=cfg.eval_limit
            )
            if eval_data
            else []
        )
        text = TokenizeConfig(
            max_length=cfg.max_length, on_too_long="truncate", completion_only=False
        )
        self.text_examples = (
            load_tokenized(
                assets.default_data("text-eval"),
                "sft",
                info.tokenizer,
                text,
                session.say,
                limit=cfg.eval_text,
            )
            if cfg.eval_text
            else []
        )
        self.math = HeldOutMath(cfg, cfg.eval_max_new_tokens)
        self.batches = Batches(
            self.train_examples,
            cfg.batch_size,
            cfg.seed,
            info.pad_id,
            packing=cfg.packing,
            max_length=cfg.max_length,
        )
        if cfg.packing:
            tokens = sum(len(ex.input_ids) for ex in self.train_examples)
            rows = self.batches.units
            session.say(
                f"packing: {len(self.train_examples)} examples in {rows} rows of up to "
                f"{cfg.max_length} tokens ({tokens / (rows * cfg.max_length):.0%} filled)"
            )

        backend, model = session.backend, session.model
        if cfg.reference:
            backend.attach_frozen(model, "reference", backend.load_model(cfg.reference, cfg.dtype))
        elif not cfg.lora and cfg.kl_beta > 0:
            backend.attach_frozen(
                model, "reference", backend.load_model(session.cfg.model, cfg.dtype)
            )
        self.has_reference = bool(cfg.reference) or cfg.lora or cfg.kl_beta > 0
        # Built once: the MLX backend caches its compiled step per loss function.
        self.loss_fn = self.make_loss()
        self.eval_loss_fn = partial(nll_and_kl_loss, measure_kl=self.has_reference)
        self.text_loss_fn = partial(nll_and_kl_loss)

    def make_loss(self):
        return partial(nll_and_kl_loss, kl_beta=self.cfg.kl_beta)

    def train_step(self, step: int) -> dict[str, float]:
        session = self.session
        batch = self.batches.batch(step)
        parts, weights = split_batch(batch, self.cfg.grad_accum)
        session.backend.seed(rank_seed(self.cfg.seed + step))  # LoRA dropout draws, per rank
        metrics = session.backend.train_step(
            session.model, session.optimizer, self.loss_fn, parts, weights
        )
        metrics["tokens"] = float((batch["attention_mask"] > 0).sum())
        return metrics

    def evaluate(self, step: int) -> dict[str, float]:
        session = self.session
        backend, model, pad = session.backend, session.model, session.info.pad_id
        out: dict[str, float] = {}
        if self.eval_examples:
            figures = held_out(backend, model, self.eval_loss_fn, self.eval_examples, pad)
            out["eval_loss"] = figures["nll"]
            out["eval_perplexity"] = math.exp(figures["nll"])
            if "kl" in figures:
                out["eval_kl"] = figures["kl"]
        if self.text_examples:
            out["text_perplexity"] = math.exp(
                held_out(backend, model, self.text_loss_fn, self.text_examples, pad)["nll"]
            )
        if self.math:
            report = self.math.score(backend, model, session.info)
            out["math_accuracy"] = report["accuracy"]
            if self.report_reasoning:
                out.update(
                    {k: report[k] for k in ("think_share", "mean_think_words", "mean_think_steps")}
                )
        return out
