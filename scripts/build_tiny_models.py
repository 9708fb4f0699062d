"""Build tiny random GPT-2 and Gemma-2 checkpoints for the parity tests.

Deterministic: the same seed writes the same weights. Each checkpoint is a
transformers `save_pretrained` directory (config.json + model.safetensors) with
a small byte-level BPE tokenizer, so both backends and transformers load it.

    python scripts/build_tiny_models.py --output /tmp/tiny
"""

from __future__ import annotations

import argparse
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from mlxpost.templates import CHAT_TEMPLATE, END, PAD, SPECIAL_TOKENS

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


def build(arch: str, output: str, seed: int = 0, **overrides) -> str:
    """Write one tiny checkpoint (and its tokenizer) to `output`; returns the path."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        model = GPT2LMHeadModel(gpt2_config(**overrides))
    elif arch == "gemma2":
        model = Gemma2ForCausalLM(gemma2_config(**overrides))
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    os.makedirs(output, exist_ok=True)
    model.save_pretrained(output)
    build_tokenizer(model.config.vocab_size).save_pretrained(output)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output", required=True, help="directory to write tiny-gpt2/ and tiny-gemma2/ into"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for arch in ("gpt2", "gemma2"):
        path = build(arch, os.path.join(args.output, f"tiny-{arch}"), seed=args.seed)
        print(path)


if __name__ == "__main__":
    main()
