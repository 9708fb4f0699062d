"""mlx-lm-lora's workers (MLX): ``train_grpo`` and ``train_dpo`` on mlx-lm's LoRA model, each
step timed by the trainer's own per-step report."""

from __future__ import annotations

import os
import time

from .measuring import grpo_result, import_peer, measured, read_jsonl, write_pairs
from .plan import DPO_BETA, bench_reward
from .tool_mlx_lm import adamw, loop_args, mlx_lm_model, mlx_report_callback


def worker_grpo_mlx_lm_lora(spec: dict) -> dict:
    grpo_module = import_peer("mlx_lm_lora.trainer.grpo_trainer", "mlx-lm-lora")

    plan = spec["plan"]
    total = plan["warmup"] + plan["grpo_steps"]
    model, tokenizer = mlx_lm_model(spec)
    tokenizer.eos_token_ids = []  # EOS-free: every sample has exactly max_completion_length
    prompts = read_jsonl(spec["data"]["grpo_prompts"])
    dataset = []
    for ex in prompts:
        text = tokenizer.apply_chat_template(
            ex["prompt"], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
        answer = str(ex.get("answer", ""))
        dataset.append((ids, tokenizer.encode(answer, add_special_tokens=False), text, answer))
    lengths = {len(d[0]) for d in dataset}
    args = grpo_module.GRPOTrainingArgs(
        **loop_args(plan["grpo_prompts"], total, "mlx-lm-lora-grpo.safetensors"),
        max_seq_length=4096,
        group_size=plan["grpo_generations"],
        beta=0.0,
        epsilon=0.2,
        max_completion_length=plan["grpo_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        grpo_loss_type="grpo",
    )
    generate = grpo_module.generate_grpo
    sampled: list[tuple[float, int]] = []

    def timed_generate(*a, **kw):
        start = time.perf_counter()
        completions, texts, indices = generate(*a, **kw)
        sampled.append((time.perf_counter() - start, sum(int(c.size) for c in completions)))
        return completions, texts, indices

    grpo_module.generate_grpo = timed_generate

    def reward(prompts, completions, answer, types=None):
        return bench_reward(prompts, completions)

    reward.__name__ = "bench_reward"
    callback = mlx_report_callback()
    grpo_module.train_grpo(
        model=model,
        ref_model=None,
        tokenizer=tokenizer,
        optimizer=adamw(),
        train_dataset=dataset,
        val_dataset=None,
        reward_funcs=[reward],
        args=args,
        training_callback=callback,
        end_answer_token="",
    )
    extra = {"prompt_lengths": sorted(lengths)}
    return grpo_result(spec, callback.steps, sampled, extra)


def shim_wired_limit() -> str:
    """train_dpo calls mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"]),
    a Metal-only figure MLX's CPU device does not report; the wired limit does not change the
    computation, so the bench answers with the machine's memory. The note for the row."""
    import mlx.core as mx

    info = mx.device_info()
    if "max_recommended_working_set_size" in info:
        return ""
    real_info = mx.device_info
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def device_info():
        return {**real_info(), "max_recommended_working_set_size": memory}

    mx.device_info = device_info
    return "mx.device_info() shimmed (mlx-lm-lora's DPO reads a Metal-only key)"


def worker_dpo_mlx_lm_lora(spec: dict) -> dict:
    dpo_module = import_peer("mlx_lm_lora.trainer.dpo_trainer", "mlx-lm-lora")
    from mlx_lm.utils import load

    plan = spec["plan"]
    total = plan["warmup"] + plan["steps"]
    note = shim_wired_limit()
    model, tokenizer = mlx_lm_model(spec)
    reference, _ = load(spec["mlx_lm_dir"])  # as mlx-lm-lora's CLI: a second copy, frozen
    reference.freeze()
    pairs = read_jsonl(write_pairs(spec, plan["dpo_pairs"] * total))

    def encode(messages, generation_prompt=False):
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return tokenizer.encode(text, add_special_tokens=False)

    dataset = []
    for pair in pairs:
        prompt_len = len(encode(pair["prompt"], True))
        dataset.append(
            {
                "chosen": encode(pair["prompt"] + pair["chosen"]),
                "rejected": encode(pair["prompt"] + pair["rejected"]),
                "chosen_prompt_length": prompt_len,
                "rejected_prompt_length": prompt_len,
            }
        )
    args = dpo_module.DPOTrainingArgs(
        **loop_args(plan["dpo_pairs"], total, "mlx-lm-lora-dpo.safetensors"),
        # its scorer feeds tokens[:-1]: one more token keeps `length` tokens per row in the forward
        max_seq_length=plan["dpo_length"] + 1,
        beta=DPO_BETA,
        loss_type="sigmoid",
    )
    callback = mlx_report_callback()
    dpo_module.train_dpo(
        model=model,
        ref_model=reference,
        optimizer=adamw(),
        train_dataset=dataset,
        val_dataset=None,
        args=args,
        training_callback=callback,
        loss_type="sigmoid",
    )
    extra = {
        "reference": "live",
        # rows cut to max_seq_length = length + 1, of which its scorer feeds `length`
        "tokens": [float(2 * plan["dpo_pairs"] * plan["dpo_length"])] * plan["steps"],
        "note": note,
    }
    return measured(spec, callback.steps, "pairs", plan["dpo_pairs"], extra)
