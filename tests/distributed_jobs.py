"""Jobs run by tests/test_distributed.py as `python`, under `torchrun` or `mlx.launch`:

    distributed_jobs.py JOBS_JSON

JOBS_JSON is a list of jobs, run one after the other in this process (one launch, one
process group, for all of them): {"cli": [args of mlxpost]} runs a command;
{"update": {"backend_name", "algorithm", "options", "output"}} one GRPO or PPO update on
fixed rollouts, split across the ranks.

The update's global batch (prompts, completions, behaviour logprobs, rewards) is drawn from a fixed
numpy seed, so every rank builds the same one and takes its share of the prompts as
`Rollouts.sample` does; the algorithm's own `train_step` then runs (advantages,
normalisers, whitening, microbatches and the backend's all-reduced update). Rank 0 saves
the trainable weights after the update and the step's metrics.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from functools import partial
from types import SimpleNamespace

import numpy as np

from mlxpost import assets, cli, distributed
from mlxpost.algorithms.grpo import GRPO, GRPOConfig, grpo_loss
from mlxpost.algorithms.ppo import PPO, PPOConfig, critic_loss, ppo_loss
from mlxpost.algorithms.ppo_control import KLController, RunningMoments
from mlxpost.algorithms.rollouts import RolloutBatch, Rollouts
from mlxpost.backend import Samples, get_backend

PROMPTS, GENERATIONS, PROMPT_TOKENS, COMPLETION_TOKENS = 4, 3, 5, 7


def fixed_rollouts(backend, model, vocab: int, temperature: float) -> dict:
    """The global batch: prompt-major rows, left-padded prompts, completions of varied
    length, behaviour logprobs near the model's own (so some ratios clip), rewards."""
    rng = np.random.default_rng(1234)
    rows = PROMPTS * GENERATIONS
    prompt_ids = rng.integers(0, vocab, (PROMPTS, PROMPT_TOKENS)).repeat(GENERATIONS, axis=0)
    prompt_mask = np.ones((rows, PROMPT_TOKENS), np.int32)
    prompt_mask[GENERATIONS:, 0] = 0  # every prompt but the first is one token shorter
    prompt_ids = prompt_ids * prompt_mask
    completion_ids = rng.integers(0, vocab, (rows, COMPLETION_TOKENS))
    lengths = rng.integers(1, COMPLETION_TOKENS + 1, rows)
    completion_mask = (np.arange(COMPLETION_TOKENS) < lengths[:, None]).astype(np.int32)
    completion_ids = completion_ids * completion_mask
    input_ids = np.concatenate([prompt_ids, completion_ids], axis=1).astype(np.int32)
    attention_mask = np.concatenate([prompt_mask, completion_mask], axis=1)
    logprobs = backend.logprobs(model, input_ids, attention_mask, temperature)[:, PROMPT_TOKENS:]
    behaviour = (logprobs + rng.normal(0, 0.3, logprobs.shape)) * completion_mask
    return {
        "prompt_ids": prompt_ids.astype(np.int32),
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids.astype(np.int32),
        "completion_mask": completion_mask,
        "logprobs": behaviour.astype(np.float32),
        "finished": lengths < COMPLETION_TOKENS,
        "rewards": rng.normal(0, 1, rows).round(1),
    }


class FixedRollouts:
    """Rollouts.sample and score on the fixed batch: this rank's share of the prompts."""

    def __init__(self, session, cfg, batch: dict):
        self.session, self.cfg = session, cfg
        prompts = distributed.shard(np.arange(PROMPTS))
        self.rows = (prompts[:, None] * GENERATIONS + np.arange(GENERATIONS)).reshape(-1)
        self.batch = {k: v[self.rows] for k, v in batch.items()}

    def sample(self, step: int) -> RolloutBatch:
        b = self.batch
        samples = Samples(
            prompt_ids=b["prompt_ids"],
            prompt_mask=b["prompt_mask"],
            completion_ids=b["completion_ids"],
            completion_mask=b["completion_mask"],
            logprobs=b["logprobs"],
            finished=b["finished"],
            prompt_index=np.arange(len(self.rows)) // GENERATIONS,
        )
        completion = b["completion_mask"].astype(np.float32)
        zeros = np.zeros(b["prompt_ids"].shape, np.float32)
        return RolloutBatch(
            samples=samples,
            texts=[""] * len(self.rows),
            source=self.rows // GENERATIONS,
            input_ids=np.concatenate([b["prompt_ids"], b["completion_ids"]], axis=1),
            attention_mask=np.concatenate([b["prompt_mask"], b["completion_mask"]], axis=1),
            loss_mask=np.concatenate([zeros, completion], axis=1),
            old_logprobs=np.concatenate([zeros, b["logprobs"]], axis=1),
        )

    def score(self, rollout) -> tuple[np.ndarray, dict]:
        return self.batch["rewards"], {}

    reference_logprobs = Rollouts.reference_logprobs
    base_model = Rollouts.base_model
    summary = Rollouts.summary


def update(backend_name: str, algorithm: str, options: dict, output: str) -> None:
    world = distributed.init(backend_name)
    backend = get_backend(backend_name)
    config_cls, algorithm_cls = (PPOConfig, PPO) if algorithm == "ppo" else (GRPOConfig, GRPO)
    cfg = config_cls(
        backend=backend_name,
        batch_size=PROMPTS,
        num_generations=GENERATIONS,
        max_new_tokens=COMPLETION_TOKENS,
        learning_rate=1.0,
        warmup_steps=0,
        steps=1,
        model=assets.default_model(),
        **options,
    )
    model = backend.load_model(cfg.model, "float32")
    if algorithm == "ppo":
        backend.attach_scalar_head(model, seed=0)
    if cfg.lora:
        backend.attach_lora(model, cfg.lora_config(), seed=0)
    world.sharded = bool(cfg.fsdp and world.size > 1)
    if world.sharded:
        backend.shard_weights(model)
    session = SimpleNamespace(
        cfg=cfg,
        backend=backend,
        model=model,
        # AdamW's first step is about lr * sign(gradient), blind to the gradient's scale and
        # touchy where it is near 0; with eps far above the gradients it is lr * gradient
        optimizer=backend.make_optimizer(model, replace(cfg.optim_config(), eps=1.0)),
        say=lambda message: None,
    )
    batch = fixed_rollouts(backend, model, 256, cfg.temperature)
    trainer = object.__new__(algorithm_cls)  # the algorithm without its data and sampler
    trainer.session, trainer.cfg = session, cfg
    trainer.loss_fn = partial(ppo_loss if algorithm == "ppo" else grpo_loss, cfg=cfg)
    trainer.reward_model = None
    if algorithm == "ppo":  # what PPO.__init__ sets besides its data: a shared critic
        trainer.policy_loss_fn = partial(ppo_loss, cfg=replace(cfg, vf_coef=0.0))
        trainer.critic_loss_fn = partial(critic_loss, cfg=cfg)
        trainer.kl = KLController(cfg.kl_beta, cfg.kl_target, cfg.kl_horizon)
        trainer.score_moments = RunningMoments() if cfg.normalise_reward_model else None
        trainer.value_moments = RunningMoments() if cfg.normalise_values else None
        trainer.critic = trainer.critic_optimizer = None
        trainer.restored = True
    trainer.rollouts = FixedRollouts(session, cfg, batch)
    metrics = distributed.reduce_metrics(trainer.train_step(0))
    params = backend.parameters(model, trainable_only=True)  # every rank: a sharded model's
    if world.is_main:
        np.savez(output, **params)
        with open(output + ".json", "w") as f:
            json.dump(metrics, f)


def main(jobs: str) -> None:
    for job in json.loads(jobs):
        if "cli" in job:
            cli.main(job["cli"], standalone_mode=False)
        else:
            update(**job["update"])


if __name__ == "__main__":
    main(sys.argv[1])
