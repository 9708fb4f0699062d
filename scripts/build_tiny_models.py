"""Build tiny random checkpoints of every supported architecture for the tests.

Deterministic: the same seed writes the same weights. Each checkpoint is a
transformers `save_pretrained` directory (config.json + model.safetensors) with
a small byte-level BPE tokenizer, so both backends and transformers load it.
Each switches on the options of its family that the defaults leave off
(grouped-query attention, rope scaling, biases, q/k norms, untied heads,
sliding windows shorter than the test sequences), so the parity tests see them.

    python scripts/build_tiny_models.py --output /tmp/tiny [--arch qwen3 ...]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from mlxpost.templates import CHAT_TEMPLATE, END, PAD, SPECIAL_TOKENS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # loaded by path from tests too
from tiny_tokenizers import save_family_tokenizer  # noqa: E402

VOCAB_SIZE = 320
CORPUS = [
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have? Answer: 7",
    "The quick brown fox jumps over the lazy dog.",
    "<|user|>\nPlease summarise the text.<|end|>\n<|assistant|>\nHere is a short summary.<|end|>",
    "<think>First add the numbers, then check the result.</think> The answer is 12.",
    "def add(a, b):\n    return a + b\n",
] * 20


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=END)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def gpt2_config(**overrides) -> GPT2Config:
    values = dict(
        vocab_size=VOCAB_SIZE,
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=True,
    )
    values.update(overrides)
    return GPT2Config(**values)


def gemma2_config(**overrides) -> Gemma2Config:
    values = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=8,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        # A large init makes the soft-caps and sliding window matter in the logits.
        initializer_range=0.2,
        pad_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=True,
    )
    values.update(overrides)
    return Gemma2Config(**values)


# Shared sizes of the Llama-like families: 4 query heads over 2 kv heads (GQA).
LLAMA_LIKE = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    # A large init makes biases, norms and windows matter in the logits.
    initializer_range=0.2,
    # The ids of scripts/tiny_tokenizers.py: pad 0, end of turn 1, BOS (where any) 2.
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=None,
)


def llama_config(**overrides) -> LlamaConfig:
    # Llama 3.x: llama3 rope scaling, biases on, an untied head.
    values = dict(
        LLAMA_LIKE,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
        bos_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def mistral_config(**overrides) -> MistralConfig:
    # Mistral's tokenizer has no pad token (mlxpost pads with EOS).
    values = dict(
        LLAMA_LIKE,
        sliding_window=8,
        head_dim=24,
        tie_word_embeddings=False,
        bos_token_id=2,
        pad_token_id=None,
    )
    values.update(overrides)
    return MistralConfig(**values)


def qwen2_config(**overrides) -> Qwen2Config:
    # q/k/v biases are always on; a sliding window on the layers from max_window_layers on.
    values = dict(
        LLAMA_LIKE,
        num_hidden_layers=3,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        tie_word_embeddings=True,
    )
    values.update(overrides)
    return Qwen2Config(**values)


def qwen3_config(**overrides) -> Qwen3Config:
    # head_dim not hidden/heads, q/k RMSNorm, linear rope scaling.
    values = dict(
        LLAMA_LIKE,
        head_dim=32,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        attention_bias=True,
        tie_word_embeddings=True,
    )
    values.update(overrides)
    return Qwen3Config(**values)


def gemma3_config(**overrides) -> Gemma3TextConfig:
    # Interleaved local and global layers (pattern 3: two sliding, one global), separate
    # local and global rope bases, linear scaling on the global layers, soft-capped logits.
    values = dict(
        LLAMA_LIKE,
        num_hidden_layers=3,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        sliding_window_pattern=3,
        rope_theta=100000.0,
        rope_local_base_freq=1000.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        bos_token_id=2,
    )
    values.update(overrides)
    return Gemma3TextConfig(**values)


def phi3_config(**overrides) -> Phi3Config:
    # Fused qkv_proj and gate_up_proj; partial rotary and longrope as in Phi-4-mini. The
    # original context (where the long factors take over) is longer than the test sequences,
    # as 4096 is for real prompts: a generation crossing it changes the rotation of later
    # tokens only, so a cached decode no longer equals a full forward, and the factors are
    # chosen per forward call, so one long row switches its whole batch (in transformers too).
    head_dim = 16
    rotary_pairs = int(head_dim * 0.75) // 2
    values = dict(
        LLAMA_LIKE,
        sliding_window=12,
        partial_rotary_factor=0.75,
        max_position_embeddings=1024,
        original_max_position_embeddings=512,
        rope_scaling={
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(rotary_pairs)],
            "long_factor": [1.0 + 0.5 * i for i in range(rotary_pairs)],
        },
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return Phi3Config(**values)


def perturb_norms_and_biases(model) -> None:
    """Random norm scales and biases: transformers initialises them to constants (ones or
    zeros), under which a missing bias or q/k norm would not show in the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.2)
            elif "norm" in name:
                centre = 0.0 if model.config.model_type.startswith("gemma") else 1.0
                param.normal_(centre, 0.3)


CONFIGS = {
    "gpt2": gpt2_config,
    "gemma2": gemma2_config,
    "llama": llama_config,
    "mistral": mistral_config,
    "qwen2": qwen2_config,
    "qwen3": qwen3_config,
    "gemma3_text": gemma3_config,
    "phi3": phi3_config,
}
ARCHITECTURES = tuple(CONFIGS)


def build(arch: str, output: str, seed: int = 0, **overrides) -> str:
    """Write one tiny checkpoint (and its tokenizer) to `output`; returns the path."""
    if arch not in CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(CONFIGS)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](**overrides))
    if arch not in ("gpt2", "gemma2"):
        perturb_norms_and_biases(model)
    os.makedirs(output, exist_ok=True)
    model.save_pretrained(output)
    save_family_tokenizer(arch, model.config.vocab_size, output)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="directory to write tiny-<arch>/ into")
    parser.add_argument(
        "--arch", action="append", choices=ARCHITECTURES, help="only these (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for arch in args.arch or ARCHITECTURES:
        path = build(arch, os.path.join(args.output, f"tiny-{arch}"), seed=args.seed)
        print(path)


if __name__ == "__main__":
    main()
