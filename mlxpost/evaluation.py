"""`mlxpost eval` tasks. Each returns a dict of figures: {"task", "n", ...}."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mlxpost.answers import extract_answer, normalise_number
from mlxpost.backend import Backend, SamplingConfig
from mlxpost.generation import encode_prompt, generate
from mlxpost.tokenizer import TokenizerInfo


@dataclass
class MathExample:
    prompt_messages: list[dict]
    gold: str  # the reference final number
    level: int | None = None


@dataclass
class MathEvalConfig:
    max_new_tokens: int = field(
        default=256, metadata={"help": "Tokens generated per answer at most."}
    )
    temperature: float = field(default=0.0, metadata={"help": "0: greedy decoding."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass when sampling."})
    top_k: int = field(default=0, metadata={"help": "Top-k when sampling (0: off)."})
    batch_size: int = field(default=64, metadata={"help": "Prompts generated together."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})


def math_examples(path: str, limit: int | None = None) -> list[MathExample]:
    """GSM8K-style records (question/answer or prompt/answer) from any supported file."""
    from mlxpost.data import load_examples

    _, examples = load_examples(path, "eval-math")
    examples = examples[:limit] if limit else examples
    return [
        MathExample(ex.prompt_messages, ex.extras["answer_number"], ex.extras.get("level"))
        for ex in examples
    ]


def evaluate_math(
    backend: Backend, model, info: TokenizerInfo, examples: list[MathExample], cfg: MathEvalConfig
) -> dict:
    """Exact-match accuracy of the extracted final number (GSM8K-style)."""
    prompts = [encode_prompt(info.tokenizer, ex.prompt_messages) for ex in examples]
    sampling = SamplingConfig(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
    )
    out = generate(
        backend, model, info, prompts, sampling, cfg.batch_size, cfg.seed, desc="eval math"
    )
    predicted = [extract_answer(text) for text in out.texts]
    correct = np.array(
        [p is not None and p == normalise_number(ex.gold) for p, ex in zip(predicted, examples)]
    )
    report = {
        "task": "math",
        "n": len(examples),
        "accuracy": float(correct.mean()) if len(examples) else 0.0,
        "answered": float(np.mean([p is not None for p in predicted])) if examples else 0.0,
        "mean_completion_tokens": float(out.lengths.mean()) if examples else 0.0,
        "truncated": float(np.mean(~out.finished)) if examples else 0.0,
    }
    levels = sorted({ex.level for ex in examples if ex.level is not None})
    if levels:
        report["accuracy_by_level"] = {
            str(level): float(np.mean([c for c, ex in zip(correct, examples) if ex.level == level]))
            for level in levels
        }
    report["samples"] = [
        {
            "prompt": ex.prompt_messages[-1]["content"],
            "completion": text,
            "predicted": p,
            "gold": ex.gold,
        }
        for ex, text, p in list(zip(examples, out.texts, predicted))[:3]
    ]
    return report
