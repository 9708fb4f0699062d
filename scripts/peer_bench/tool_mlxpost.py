"""mlxpost's workers, on either backend: SFT through ``Backend.train_step``; GRPO and DPO
through the algorithm's ``train_step(step)``, as ``mlxpost grpo`` and ``mlxpost dpo`` run it."""

from __future__ import annotations

import os
import time
from functools import partial

import numpy as np

from .measuring import Steps, grpo_result, measured, sft_rows, torch_setup, write_pairs
from .plan import (
    DPO_BETA,
    LEARNING_RATE,
    LORA_ALPHA,
    LORA_RANK,
    LORA_TARGETS,
    NEVER_EOS,
    bench_reward,
)


def worker_sft_mlxpost(spec: dict) -> dict:
    from mlxpost.algorithms.supervised import nll_and_kl_loss
    from mlxpost.backend import LoraConfig, OptimConfig, get_backend
    from mlxpost.batching import split_batch
    from mlxpost.functional import prediction_mask
    from mlxpost.tokenizer import load_tokenizer

    plan, seed = spec["plan"], spec["seed"]
    backend = get_backend(spec["framework"])
    if spec["framework"] == "torch":
        torch_setup(spec)
    backend.seed(seed)
    load_tokenizer(spec["model_dir"])  # as `mlxpost sft` does (and every peer), for the memory
    model = backend.load_model(spec["model_dir"], "float32")
    backend.attach_lora(model, LoraConfig(LORA_RANK, LORA_ALPHA, 0.0, LORA_TARGETS), seed=seed)
    total = plan["warmup"] + plan["steps"]
    optimizer = backend.make_optimizer(
        model,
        OptimConfig(
            learning_rate=LEARNING_RATE, warmup_steps=0, total_steps=total, min_lr_ratio=0.0
        ),
    )
    loss_fn = partial(nll_and_kl_loss, kl_beta=0.0)  # what `mlxpost sft` trains with
    rows = sft_rows(spec)
    batch_size = plan["sft_batch"]
    steps = Steps()
    for step in range(total):
        ids = rows[step * batch_size : (step + 1) * batch_size].astype(np.int32)
        mask = np.ones_like(ids)
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "loss_mask": prediction_mask(mask).astype(np.float32),
        }
        steps.begin()
        parts, weights = split_batch(batch, 1)
        backend.seed(seed + step)
        metrics = backend.train_step(model, optimizer, loss_fn, parts, weights)  # host floats
        steps.end()
    trainable, total_params = backend.parameter_count(model)
    extra = {
        "final_loss": float(metrics["loss"]),
        "trainable_params": int(trainable),
        "total_params": int(total_params),
    }
    return measured(spec, steps, "tokens", ids.size, extra)


def algorithm_settings(spec: dict, command: str, total: int) -> dict:
    """The GRPOConfig / DPOConfig fields both algorithms are run with."""
    return dict(
        backend=spec["framework"],
        model=spec["model_dir"],
        output=os.path.join(os.getcwd(), f"mlxpost-{command}"),
        steps=total,
        learning_rate=LEARNING_RATE,
        warmup_steps=0,
        lora_rank=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        eval_every=0,
        save_every=0,
        seed=spec["seed"],
    )


def timed_train_steps(algorithm, total: int) -> tuple[Steps, list[dict]]:
    """Run `total` steps of an algorithm; their times and metrics."""
    steps, metrics = Steps(), []
    for step in range(total):
        steps.begin()
        metrics.append(algorithm.train_step(step))
        steps.end()
    return steps, metrics


def reward_file() -> str:
    """bench_reward alone in a file, for mlxpost's `file.py:function` reward loader."""
    import inspect

    path = os.path.join(os.getcwd(), "bench_reward.py")
    with open(path, "w") as f:
        f.write(inspect.getsource(bench_reward))
    return path


def worker_grpo_mlxpost(spec: dict) -> dict:
    from mlxpost.algorithms.grpo import GRPO, GRPOConfig
    from mlxpost.loop import setup

    plan = spec["plan"]
    if spec["framework"] == "torch":
        torch_setup(spec)
    total = plan["warmup"] + plan["grpo_steps"]
    config = GRPOConfig(
        **algorithm_settings(spec, "grpo", total),
        data=spec["data"]["grpo_prompts"],
        batch_size=plan["grpo_prompts"],
        num_generations=plan["grpo_generations"],
        max_new_tokens=plan["grpo_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        rewards=f"{reward_file()}:bench_reward",
        kl_beta=0.0,
        log_kl=False,  # no reference forward: TRL and mlx-lm-lora skip it at KL weight 0
        aggregation="grpo",
        advantage="group",
        eval_math=0,
    )
    session = setup("grpo", config)
    session.info.eos_ids = [NEVER_EOS]  # EOS-free: every sample has exactly max_new_tokens
    algorithm = GRPO(session, config)
    sampler = algorithm.rollouts.sample
    sampled: list[tuple[float, int]] = []

    def timed_sample(step):
        start = time.perf_counter()
        batch = sampler(step)
        sampled.append((time.perf_counter() - start, int(batch.samples.completion_mask.sum())))
        return batch

    algorithm.rollouts.sample = timed_sample
    reference = algorithm.rollouts.reference_logprobs
    reference_seconds: list[float] = []

    def timed_reference(batch):
        start = time.perf_counter()
        out = reference(batch)
        reference_seconds.append(time.perf_counter() - start)
        return out

    algorithm.rollouts.reference_logprobs = timed_reference
    steps, metrics = timed_train_steps(algorithm, total)
    warmup = plan["warmup"]
    share = sum(reference_seconds[warmup:]) / max(sum(steps.wall[warmup:]), 1e-9)
    extra = {
        "final_loss": float(metrics[-1]["loss"]),
        "reference_seconds": reference_seconds[warmup:],
        "note": f"reference logprobs (only logged: KL weight 0) take {100 * share:.0f}% of a step"
        if reference_seconds
        else "",
    }
    return grpo_result(spec, steps, sampled, extra)


def worker_dpo_mlxpost(spec: dict) -> dict:
    from mlxpost.algorithms.dpo import DPO
    from mlxpost.algorithms.preference import DPOConfig
    from mlxpost.loop import setup

    plan = spec["plan"]
    if spec["framework"] == "torch":
        torch_setup(spec)
    total = plan["warmup"] + plan["steps"]
    reference = spec["dpo_reference"]
    config = DPOConfig(
        **algorithm_settings(spec, "dpo", total),
        data=write_pairs(spec, plan["dpo_pairs"] * total),
        batch_size=plan["dpo_pairs"],
        max_length=plan["dpo_length"],
        on_too_long="truncate",
        loss="sigmoid",
        beta=DPO_BETA,
        reference_mode=reference,
    )
    session = setup("dpo", config)
    algorithm = DPO(session, config)
    steps, metrics = timed_train_steps(algorithm, total)
    extra = {
        "reference": reference,
        "tokens": [m.get("tokens", 0.0) for m in metrics[plan["warmup"] :]],
        "final_loss": float(metrics[-1]["loss"]),
    }
    return measured(spec, steps, "pairs", plan["dpo_pairs"], extra)
