"""TRL's workers (torch): ``SFTTrainer``, ``GRPOTrainer`` and ``DPOTrainer`` with PEFT LoRA,
each step timed by a ``TrainerCallback`` from ``on_step_begin`` to ``on_step_end``."""

from __future__ import annotations

import os
import time

import numpy as np

from .measuring import (
    Steps,
    grpo_result,
    import_peer,
    measured,
    read_jsonl,
    sft_rows,
    torch_setup,
    write_pairs,
)
from .plan import DPO_BETA, LEARNING_RATE, LORA_ALPHA, LORA_RANK, LORA_TARGETS, bench_reward


def trl_common_args(spec: dict, output_dir: str, total_steps: int) -> dict:
    """TrainingArguments shared by the TRL trainers: float32, no checkpointing, no logging."""
    import torch

    return dict(
        output_dir=output_dir,
        max_steps=total_steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=10**6,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=spec["seed"],
    )


def peft_lora_config():
    peft = import_peer("peft", "peft")
    return peft.LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        fan_in_fan_out=True,  # GPT-2's Conv1D stores (in, out)
        bias="none",
        task_type="CAUSAL_LM",
    )


def step_timer_callback():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps = Steps()

        def on_step_begin(self, args, state, control, **kwargs):
            self.steps.begin()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.end()

    return StepTimer()


def trl_trainer(spec: dict, trainer_class, config, dataset, **kwargs):
    """(trainer, its step timer): `trainer_class` on the checkpoint in float32 with its
    dropouts off (mlxpost trains in eval mode), with PEFT LoRA."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"],
        dtype=torch.float32,
        attn_pdrop=0.0,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
    )
    timer = step_timer_callback()
    trainer = trainer_class(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(spec["model_dir"]),
        peft_config=peft_lora_config(),
        callbacks=[timer],
        **kwargs,
    )
    return trainer, timer


def worker_sft_trl(spec: dict) -> dict:
    trl = import_peer("trl", "trl")
    torch_setup(spec)
    from datasets import Dataset

    plan = spec["plan"]
    total = plan["warmup"] + plan["steps"]
    dataset = Dataset.from_dict({"input_ids": sft_rows(spec).astype(np.int64).tolist()})
    config = trl.SFTConfig(
        **trl_common_args(spec, os.path.join(os.getcwd(), "trl-sft"), total),
        per_device_train_batch_size=plan["sft_batch"],
        max_length=plan["sft_seq_len"],
        packing=False,
        padding_free=False,
    )
    trainer, timer = trl_trainer(spec, trl.SFTTrainer, config, dataset)
    trainer.train()
    counted = getattr(trainer, "_total_train_tokens", None)  # TRL's own attention-mask count
    tokens_per_step = plan["sft_batch"] * plan["sft_seq_len"]
    note = ""
    if counted is not None and counted != tokens_per_step * total:
        note = f"TRL counted {counted} tokens, expected {tokens_per_step * total}"
    extra = {"trl_counted_tokens": counted, "note": note}
    return measured(spec, timer.steps, "tokens", tokens_per_step, extra)


def worker_grpo_trl(spec: dict) -> dict:
    trl = import_peer("trl", "trl")
    torch_setup(spec)
    from datasets import Dataset

    plan = spec["plan"]
    total = plan["warmup"] + plan["grpo_steps"]
    prompts = read_jsonl(spec["data"]["grpo_prompts"])
    dataset = Dataset.from_list([{"prompt": ex["prompt"]} for ex in prompts])
    new_tokens = plan["grpo_new_tokens"]
    config = trl.GRPOConfig(
        **trl_common_args(spec, os.path.join(os.getcwd(), "trl-grpo"), total),
        per_device_train_batch_size=plan["grpo_prompts"] * plan["grpo_generations"],
        num_generations=plan["grpo_generations"],
        max_completion_length=new_tokens,
        generation_kwargs={"min_new_tokens": new_tokens},  # EOS-free: exactly new_tokens
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        loss_type="grpo",
        scale_rewards="group",
        num_iterations=1,
        disable_dropout=True,
        log_completions=False,
    )

    def reward(prompts, completions, **kwargs):
        return bench_reward(prompts, completions)

    reward.__name__ = "bench_reward"
    trainer, timer = trl_trainer(spec, trl.GRPOTrainer, config, dataset, reward_funcs=[reward])
    generate = trainer._generate_single_turn
    sampled: list[tuple[float, int]] = []
    prompt_lengths: set[int] = set()

    def timed_generate(prompt_ids, *args, **kwargs):
        start = time.perf_counter()
        out = generate(prompt_ids, *args, **kwargs)
        completion_ids = out[0]
        sampled.append((time.perf_counter() - start, sum(len(c) for c in completion_ids)))
        prompt_lengths.update(len(p) for p in prompt_ids)
        return out

    trainer._generate_single_turn = timed_generate
    trainer.train()
    extra = {"prompt_lengths": sorted(prompt_lengths)}
    expected_prompt = spec["data"]["grpo_prompt_length"]
    if prompt_lengths and prompt_lengths != {expected_prompt}:
        extra["note"] = (
            f"TRL prompts of {sorted(prompt_lengths)} tokens (others: {expected_prompt})"
        )
    return grpo_result(spec, timer.steps, sampled, extra)


def worker_dpo_trl(spec: dict) -> dict:
    trl = import_peer("trl", "trl")
    torch_setup(spec)
    from datasets import Dataset

    plan = spec["plan"]
    total = plan["warmup"] + plan["steps"]
    pairs = read_jsonl(write_pairs(spec, plan["dpo_pairs"] * total))
    dataset = Dataset.from_list(pairs)
    config = trl.DPOConfig(
        **trl_common_args(spec, os.path.join(os.getcwd(), "trl-dpo"), total),
        per_device_train_batch_size=plan["dpo_pairs"],
        max_length=plan["dpo_length"],
        truncation_mode="keep_start",
        loss_type=["sigmoid"],
        beta=DPO_BETA,
        precompute_ref_log_probs=spec["dpo_reference"] == "precompute",
        disable_dropout=True,
    )
    trainer, timer = trl_trainer(spec, trl.DPOTrainer, config, dataset)
    widths: list[int] = []
    compute_loss = trainer.compute_loss

    def counting_loss(model, inputs, *args, **kwargs):
        widths.append(int(inputs["attention_mask"].sum()))
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = counting_loss
    trainer.train()
    extra = {"reference": spec["dpo_reference"], "tokens": widths[plan["warmup"] :]}
    return measured(spec, timer.steps, "pairs", plan["dpo_pairs"], extra)
