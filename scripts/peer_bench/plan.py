"""What the peer benchmark measures: the tools, the shared settings, the shapes per
(model, framework), the FLOP model behind MFU and the GRPO reward."""

from __future__ import annotations

import os
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "bench_peers.py")  # the entry point; workers rerun it

TASKS = ("sft", "grpo", "dpo")
MODELS = ("tiny", "gpt2-124m")
TOOLS = {  # tool -> (framework, tasks it runs)
    "mlxpost-torch": ("torch", TASKS),
    "trl": ("torch", TASKS),
    "mlxpost-mlx": ("mlx", TASKS),
    "mlx-lm": ("mlx", ("sft",)),
    "mlx-lm-lora": ("mlx", ("grpo", "dpo")),
}
BASELINE = {"torch": "mlxpost-torch", "mlx": "mlxpost-mlx"}

LORA_RANK = 8
LORA_ALPHA = 16.0
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # mlxpost's GPT-2 default; PEFT suffix names
MLX_LM_LORA_KEYS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LEARNING_RATE = 1e-4
DPO_BETA = 0.1
NEVER_EOS = -1  # no token id is negative: mlxpost samples never stop early


@dataclass
class Plan:
    """The shapes and step counts one (model, framework) pair is measured at."""

    sft_batch: int
    sft_seq_len: int
    grpo_prompts: int
    grpo_generations: int
    grpo_new_tokens: int
    dpo_pairs: int
    dpo_length: int
    warmup: int
    steps: int
    grpo_steps: int
    note: str = ""

    def shape(self, task: str) -> str:
        if task == "sft":
            return f"{self.sft_batch}x{self.sft_seq_len}"
        if task == "grpo":
            return f"{self.grpo_prompts}x{self.grpo_generations}x{self.grpo_new_tokens}"
        return f"{self.dpo_pairs}x{self.dpo_length}"


PLANS = {  # sft batch, seq_len; grpo prompts, samples, new tokens; dpo pairs, length
    ("tiny", "torch"): Plan(8, 128, 4, 4, 32, 8, 64, warmup=2, steps=10, grpo_steps=5),
    ("tiny", "mlx"): Plan(4, 64, 2, 4, 16, 4, 64, warmup=2, steps=5, grpo_steps=3),
    ("gpt2-124m", "torch"): Plan(4, 128, 2, 4, 32, 4, 64, warmup=1, steps=4, grpo_steps=3),
    ("gpt2-124m", "mlx"): Plan(1, 64, 1, 2, 16, 1, 32, warmup=1, steps=3, grpo_steps=2),
}
QUICK_PLANS = {
    ("tiny", "torch"): Plan(4, 64, 2, 2, 8, 2, 32, warmup=1, steps=2, grpo_steps=2),
    ("tiny", "mlx"): Plan(2, 32, 1, 2, 8, 1, 32, warmup=1, steps=2, grpo_steps=1),
    ("gpt2-124m", "torch"): Plan(1, 32, 1, 2, 4, 1, 32, warmup=1, steps=1, grpo_steps=1),
    ("gpt2-124m", "mlx"): Plan(1, 32, 1, 2, 4, 1, 32, warmup=1, steps=1, grpo_steps=1),
}


# ---- the FLOP model (scripts/bench_peers.py's docstring derives it) ----


def gpt2_dims(config: dict) -> tuple[int, int, int, int]:
    """(d_model, n_layer, vocab, MLP inner width) of a GPT-2 config.json."""
    if config.get("model_type") != "gpt2":
        raise ValueError(f"FLOP counts are written for GPT-2, not {config.get('model_type')!r}")
    d = int(config["n_embd"])
    inner = int(config.get("n_inner") or 4 * d)
    return d, int(config["n_layer"]), int(config["vocab_size"]), inner


def matmul_params(config: dict) -> int:
    """N: weights a token is multiplied with: per layer c_attn (d x 3d), attn.c_proj (d x d),
    mlp.c_fc (d x inner), mlp.c_proj (inner x d), plus the (vocab x d) LM head."""
    d, layers, vocab, inner = gpt2_dims(config)
    return layers * (3 * d * d + d * d + 2 * d * inner) + vocab * d


def lora_params(config: dict, rank: int, targets=LORA_TARGETS) -> int:
    """N_lora: rank * (in + out) per adapted matrix (PEFT suffix matching: c_proj is both)."""
    d, layers, _, inner = gpt2_dims(config)
    shapes = {
        "c_attn": [(d, 3 * d)],
        "c_proj": [(d, d), (inner, d)],
        "c_fc": [(d, inner)],
    }
    per_layer = sum(rank * (a + b) for t in set(targets) for a, b in shapes.get(t, []))
    return layers * per_layer


def lora_train_flops_per_token(config: dict, seq_len: int, rank: int, targets=LORA_TARGETS):
    """4 N + 6 N_lora + 12 n_layer d_model seq_len (see scripts/bench_peers.py's docstring)."""
    d, layers, _, _ = gpt2_dims(config)
    return (
        4 * matmul_params(config)
        + 6 * lora_params(config, rank, targets)
        + 12 * layers * d * seq_len
    )


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    return tokens_per_s * flops_per_token / peak_flops


# ---- the GRPO reward ----


def bench_reward(prompts, completions, **_) -> list[float]:
    """The benchmark's reward: the share of distinct words in a completion (cheap, varied).
    Completions may be strings or TRL's conversational [{"role", "content"}] lists."""
    out = []
    for completion in completions:
        if isinstance(completion, list):
            completion = " ".join(m.get("content", "") for m in completion)
        words = str(completion).split()
        out.append(len(set(words)) / len(words) if words else 0.0)
    return out
