"""What GRPO and PPO share: options, prompts, sampling, rewards and rollout batches.

Prompts of step s are drawn from a permutation seeded by (seed, epoch) and the
sampler is seeded by (seed, step), so a resumed run samples what an
uninterrupted one would have. In a data-parallel run each rank samples its share
of the step's prompts with a seed of its own (mlxpost.distributed).

Samples come from a rollout engine (`RolloutEngine`): by default the training backend's own
sampler on the live model (`BackendEngine`); another engine (vLLM, a server) plugs in through
the same two methods without touching the algorithms. Its logprobs are the old logprobs of
the losses unless the importance-sampling correction (algorithms/importance.py) is on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import numpy as np

from mlxpost import assets
from mlxpost.algorithms.importance import MODES as IMPORTANCE_MODES
from mlxpost.algorithms.importance import importance_weights
from mlxpost.backend import Samples, SamplingConfig, adapter_disabled
from mlxpost.batching import step_indices
from mlxpost.config import TrainConfig, option
from mlxpost.data import load_examples
from mlxpost.distributed import rank_seed, shard
from mlxpost.errors import UserError
from mlxpost.evaluation import HeldOutMath, eval_math_data_option, eval_math_option
from mlxpost.generation import encode_prompt
from mlxpost.loop import Session
from mlxpost.rewards import RewardSet, parse_weights


@dataclass
class RLConfig(TrainConfig):
    batch_size: int = option(8, "Prompts per step (each gets --num-generations completions).")
    learning_rate: float = option(5e-4, "Peak learning rate (AdamW).")
    steps: int = option(100, "Steps (one batch of rollouts each).")
    num_generations: int = option(8, "Completions per prompt.", ge=1)
    max_new_tokens: int = option(128, "Tokens generated per completion at most.", ge=1)
    temperature: float = option(
        1.0, "Sampling temperature (also used for the trainer's logprobs).", ge=0
    )
    top_p: float = option(1.0, "Nucleus sampling mass.", gt=0, le=1)
    top_k: int = option(0, "Top-k sampling (0: off).", ge=0)
    rewards: str = option(
        "math,format",
        "Comma-separated reward functions: built-ins (math, format, repetition, answered), module:function, or path/to/file.py:function. Naming a module or file imports it, which runs its code: name only code you trust.",
    )
    reward_weights: str | None = option(
        None, "Comma-separated weights, one per reward (default: all 1)."
    )
    reward_failure_share: float = option(
        1.0,
        "Stop (exit status 2) when a reward function fails (raises, returns the wrong count, a non-number or NaN) on at least this share of a step's completions; below it a failed completion scores 0 and is counted in reward_errors/<name>. Default: stop only when it fails on all of them.",
        gt=0,
        le=1,
    )
    kl_beta: float = option(
        0.0,
        "Weight of the KL to the reference (the adapter off; with --full the base checkpoint); 0: off.",
        ge=0,
    )
    kl_estimator: str = option("k3", "KL estimator (Schulman's k1, k2, k3).", ("k1", "k2", "k3"))
    ppo_epochs: int = option(1, "Optimisation passes over each batch of rollouts.", ge=1)
    mask_truncated: bool = option(
        False, "Leave completions cut at --max-new-tokens out of the loss."
    )
    importance_correction: str = option(
        "none",
        "Importance-sampling correction of a sampler/trainer mismatch (TRL's vllm_importance_sampling_mode): weight each token's policy loss by the trainer/sampler probability ratio per token or per sequence, truncated at the cap or masked (0) beyond it; the trainer's own logprobs become the old ones. Costs one more forward pass per step; none: off (mlxpost's samplers match the trainer to rounding).",
        IMPORTANCE_MODES,
    )
    importance_cap: float = option(
        3.0, "Upper cap of the importance ratio (TRL's vllm_importance_sampling_clip_max).", gt=0
    )
    importance_floor: float | None = option(
        None,
        "Lower cap of the importance ratio (TRL's vllm_importance_sampling_clip_min); none: no floor.",
        ge=0,
    )
    eval_every: int = option(10, "Evaluate every N steps (0: only at the end).")
    save_every: int = option(50, "Checkpoint every N steps (0: only the final one).")
    eval_math: int = eval_math_option(200)
    eval_math_data: str | None = eval_math_data_option()

    def __post_init__(self):
        super().__post_init__()
        parse_weights(self.rewards, self.reward_weights)  # before any model is loaded
        if self.importance_floor is not None and self.importance_floor >= self.importance_cap:
            raise UserError(
                f"--importance-floor ({self.importance_floor}) must be below --importance-cap "
                f"({self.importance_cap})"
            )


@dataclass
class RolloutBatch:
    samples: Samples
    texts: list[str]  # decoded completions
    source: np.ndarray  # (N,) index of each row's prompt in the dataset
    input_ids: np.ndarray  # (N, P + C) prompt (left padded) then completion (right padded)
    attention_mask: np.ndarray
    loss_mask: np.ndarray  # float32 (N, P + C): completion tokens that count
    old_logprobs: np.ndarray  # behaviour logprobs aligned with input_ids, 0 elsewhere
    # importance-sampling correction, when on: {"importance_weights": (N, P + C)} for the loss
    correction: dict[str, np.ndarray] = field(default_factory=dict)
    mismatch: dict[str, float] = field(default_factory=dict)  # sampler vs trainer metrics


class RolloutEngine(Protocol):
    """What samples a step's completions for GRPO and PPO."""

    def sync_weights(self) -> None:
        """Called before each step's sampling: an engine holding its own copy of the weights
        loads the trainer's current ones here."""

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        cfg: SamplingConfig,
        eos_ids: Sequence[int],
        pad_id: int,
        seed: int,
    ) -> Samples:
        """cfg.n completions per prompt with behaviour logprobs under the Samples contract."""


class BackendEngine:
    """The training backend's own sampler on the live model: the weights are shared, so there
    is nothing to sync."""

    def __init__(self, session: Session):
        self.session = session

    def sync_weights(self) -> None:
        pass

    def sample(self, prompts, cfg, eos_ids, pad_id, seed) -> Samples:
        session = self.session
        return session.backend.sample(session.model, prompts, cfg, eos_ids, pad_id, seed=seed)


class Rollouts:
    def __init__(
        self, session: Session, cfg: RLConfig, command: str, engine: RolloutEngine | None = None
    ):
        self.session, self.cfg = session, cfg
        self.engine = engine or BackendEngine(session)
        data = cfg.data or assets.default_data(command)
        _, self.examples = load_examples(data, command)
        tokenizer = session.info.tokenizer
        self.prompts = [encode_prompt(tokenizer, ex.prompt_messages) for ex in self.examples]
        self.prompt_texts = [tokenizer.decode(p) for p in self.prompts]
        self.rewards = RewardSet.parse(cfg.rewards, cfg.reward_weights, cfg.reward_failure_share)
        self.math = HeldOutMath(cfg, cfg.max_new_tokens)
        session.say(
            f"{data}: {len(self.examples)} prompts; rewards {', '.join(self.rewards.names) or 'none'}"
        )

    def sample(self, step: int) -> RolloutBatch:
        session, cfg = self.session, self.cfg
        info = session.info
        # This rank's prompts: a prompt's completions (a GRPO group) stay on one rank.
        chosen = shard(step_indices(cfg.seed, step, cfg.batch_size, len(self.examples)))
        sampling = SamplingConfig(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            n=cfg.num_generations,
        )
        self.engine.sync_weights()
        samples = self.engine.sample(
            [self.prompts[i] for i in chosen],
            sampling,
            info.eos_ids,
            info.pad_id,
            seed=rank_seed(cfg.seed * 1_000_003 + step),
        )
        texts = [
            info.tokenizer.decode(row[m == 1], skip_special_tokens=True)
            for row, m in zip(samples.completion_ids, samples.completion_mask)
        ]
        completion = samples.completion_mask.astype(np.float32)
        if cfg.mask_truncated:
            completion = completion * samples.finished[:, None]
        batch = RolloutBatch(
            samples=samples,
            texts=texts,
            source=chosen[samples.prompt_index],
            input_ids=np.concatenate([samples.prompt_ids, samples.completion_ids], axis=1),
            attention_mask=np.concatenate([samples.prompt_mask, samples.completion_mask], axis=1),
            loss_mask=np.concatenate(
                [np.zeros(samples.prompt_ids.shape, np.float32), completion], axis=1
            ),
            old_logprobs=np.concatenate(
                [np.zeros(samples.prompt_ids.shape, np.float32), samples.logprobs], axis=1
            ),
        )
        if cfg.importance_correction != "none":
            self.correct(batch)
        return batch

    def correct(self, batch: RolloutBatch) -> None:
        """The importance-sampling correction (algorithms/importance.py): the trainer's own
        logprobs of the sampled tokens become the old logprobs, and the loss weights and the
        mismatch metrics come from their ratio to the sampler's."""
        backend, model, cfg = self.session.backend, self.session.model, self.cfg
        completion = np.concatenate(
            [np.zeros(batch.samples.prompt_ids.shape), batch.samples.completion_mask], axis=1
        )
        trainer = backend.logprobs(model, batch.input_ids, batch.attention_mask, cfg.temperature)
        trainer = (trainer * completion).astype(np.float32)
        weights, batch.mismatch = importance_weights(
            trainer,
            batch.old_logprobs,
            completion,
            cfg.importance_correction,
            cfg.importance_cap,
            cfg.importance_floor,
        )
        batch.correction = {"importance_weights": weights}
        batch.old_logprobs = trainer

    def score(self, batch: RolloutBatch) -> tuple[np.ndarray, dict]:
        columns = {
            key: [self.examples[i].extras.get(key) for i in batch.source]
            for key in self.examples[0].extras
        }
        prompts = [self.prompt_texts[i] for i in batch.source]
        return self.rewards.score(prompts, batch.texts, columns, self.session.say)

    def reference_logprobs(self, batch: RolloutBatch) -> np.ndarray:
        """The reference's logprobs of the rollout tokens, at the sampling temperature: the
        model with its adapter off, or with --full (no adapter to switch off) the base
        checkpoint, loaded on first use."""
        backend, model, cfg = self.session.backend, self.session.model, self.cfg
        ids, mask = batch.input_ids, batch.attention_mask
        if cfg.lora:
            with adapter_disabled(backend, model):
                ref = backend.logprobs(model, ids, mask, cfg.temperature)
        else:
            ref = backend.logprobs(self.base_model, ids, mask, cfg.temperature)
        return (ref * batch.loss_mask).astype(np.float32)

    @cached_property
    def base_model(self):
        """The frozen base checkpoint: the reference of a full fine-tuning run."""
        return self.session.backend.load_model(self.cfg.model, self.cfg.dtype)

    def summary(self, batch: RolloutBatch) -> dict[str, float]:
        samples = batch.samples
        return {
            "completion_length": float(samples.completion_mask.sum(axis=1).mean()),
            "truncated": float(np.mean(~samples.finished)),
            "tokens": float(batch.attention_mask.sum()),
            **batch.mismatch,
        }

    def evaluate(self) -> dict[str, float]:
        if not self.math:
            return {}
        session = self.session
        report = self.math.score(session.backend, session.model, session.info)
        return {
            "math_accuracy": report["accuracy"],
            "eval_completion_length": report["mean_completion_tokens"],
        }
