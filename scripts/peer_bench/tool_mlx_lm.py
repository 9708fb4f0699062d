"""mlx-lm's worker (SFT through ``mlx_lm.tuner.trainer.train``, what ``mlx_lm.lora`` runs),
and the model, loop settings and step timer that mlx-lm-lora's trainers share with it."""

from __future__ import annotations

import os

from .measuring import Steps, import_peer, measured, sft_rows
from .plan import LEARNING_RATE, LORA_ALPHA, LORA_RANK, MLX_LM_LORA_KEYS


def mlx_lm_model(spec: dict):
    """mlx-lm's GPT-2 with its LoRA layers on every projection (scale = alpha / rank)."""
    import_peer("mlx_lm", "mlx-lm")
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    mx.random.seed(spec["seed"])
    model, tokenizer = load(spec["mlx_lm_dir"])
    model.freeze()
    linear_to_lora_layers(
        model,
        len(model.layers),
        {
            "rank": LORA_RANK,
            "scale": LORA_ALPHA / LORA_RANK,
            "dropout": 0.0,
            "keys": list(MLX_LM_LORA_KEYS),
        },
    )
    return model, tokenizer


def loop_args(batch_size: int, iters: int, adapter_file: str) -> dict:
    """The TrainingArgs fields of a timed run: a report every step (the step timer), no
    evaluation, no checkpoint before the end."""
    return dict(
        batch_size=batch_size,
        iters=iters,
        val_batches=0,
        steps_per_report=1,
        steps_per_eval=10**9,
        steps_per_save=10**9,
        adapter_file=os.path.join(os.getcwd(), adapter_file),
    )


def adamw():
    import mlx.optimizers as optim

    return optim.AdamW(learning_rate=LEARNING_RATE, weight_decay=0.0)


def mlx_report_callback():
    from mlx_lm.tuner.callbacks import TrainingCallback

    class Reports(TrainingCallback):
        """steps_per_report=1: each report is one step, timed by the trainer itself."""

        def __init__(self):
            self.reports: list[dict] = []
            self.steps = Steps()

        def on_train_loss_report(self, train_info: dict):
            self.reports.append(dict(train_info))
            self.steps.add(1.0 / train_info["iterations_per_second"])

    return Reports()


def worker_sft_mlx_lm(spec: dict) -> dict:
    import_peer("mlx_lm", "mlx-lm")
    from mlx_lm.tuner.trainer import TrainingArgs, train

    plan = spec["plan"]
    total = plan["warmup"] + plan["steps"]
    model, _ = mlx_lm_model(spec)
    rows = sft_rows(spec)
    dataset = [(row.tolist(), 0) for row in rows]  # (tokens, offset): loss on every token
    args = TrainingArgs(
        **loop_args(plan["sft_batch"], total, "mlx-lm-adapters.safetensors"),
        max_seq_length=plan["sft_seq_len"] + 1,
    )
    callback = mlx_report_callback()
    train(model, adamw(), dataset, None, args=args, training_callback=callback)
    final_loss = callback.reports[-1]["train_loss"] if callback.reports else None
    tokens_per_step = plan["sft_batch"] * plan["sft_seq_len"]
    return measured(spec, callback.steps, "tokens", tokens_per_step, {"final_loss": final_loss})
