"""`mlxpost eval` tasks. Each returns a dict of figures: {"task", "n", ...}."""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from mlxpost import assets
from mlxpost.answers import extract_answer, normalise_number
from mlxpost.backend import Backend
from mlxpost.config import option
from mlxpost.errors import UserError
from mlxpost.generation import generate_replies
from mlxpost.tokenizer import TokenizerInfo


@dataclass
class MathExample:
    prompt_messages: list[dict]
    gold: str  # the reference final number
    level: int | None = None


def check_sampling(cfg) -> None:
    """An eval config's generation options, named as the command line spells them."""
    if cfg.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {cfg.max_new_tokens}")
    if not math.isfinite(cfg.temperature) or cfg.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or positive, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if cfg.top_k < 0:
        raise UserError(f"--top-k must be 0 (off) or positive, got {cfg.top_k}")
    check_batch_size(cfg)
    if cfg.seed < 0:
        raise UserError(f"--seed must be 0 or positive, got {cfg.seed}")


def check_batch_size(cfg) -> None:
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {cfg.batch_size}")


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

    def __post_init__(self):
        check_sampling(self)


def eval_math_option(default: int):
    """--eval-math of a training command (sft, dpo, grpo, ppo); each chooses its default."""
    return option(
        default, "Held-out math problems scored greedily at each evaluation (0: off).", ge=0
    )


def eval_math_data_option():
    """--eval-math-data of a training command."""
    return option(
        None,
        "Math problems (question/answer) for --eval-math; default: the bundled math test split.",
    )


class HeldOutMath:
    """Held-out math accuracy during training, for every command with --eval-math: the
    problems (read once, when the algorithm starts) and their greedy scoring."""

    def __init__(self, cfg, max_new_tokens: int):
        path = cfg.eval_math_data or assets.default_data("eval-math")
        self.examples = math_examples(path, cfg.eval_math) if cfg.eval_math else []
        self.generation = MathEvalConfig(max_new_tokens=max_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.examples)

    def score(self, backend: Backend, model, info: TokenizerInfo, keep_texts: bool = False) -> dict:
        """evaluate_math's report on the problems (with every completion when keep_texts)."""
        return evaluate_math(backend, model, info, self.examples, self.generation, keep_texts)


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
    backend: Backend,
    model,
    info: TokenizerInfo,
    examples: list[MathExample],
    cfg: MathEvalConfig,
    keep_texts: bool = False,
) -> dict:
    """Exact-match accuracy of the extracted final number (GSM8K-style); with keep_texts the
    report's "completions" holds every completion (PPO scores them with its reward model)."""
    out = generate_replies(
        backend, model, info, [ex.prompt_messages for ex in examples], cfg, "eval math"
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
    report.update(reasoning_stats(out.texts))
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
    if keep_texts:
        report["completions"] = list(out.texts)
    return report


THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def reasoning_stats(texts: list[str]) -> dict:
    """How much the completions reason: share with a <think> block, and that block's
    mean size in words and in non-empty lines (steps), over the completions that have one."""
    blocks = [m.group(1) for m in (THINK.search(t) for t in texts) if m]
    return {
        "think_share": len(blocks) / len(texts) if texts else 0.0,
        "mean_think_words": float(np.mean([len(b.split()) for b in blocks])) if blocks else 0.0,
        "mean_think_steps": float(
            np.mean([sum(1 for line in b.splitlines() if line.strip()) for b in blocks])
        )
        if blocks
        else 0.0,
    }


@dataclass
class PerplexityConfig:
    batch_size: int = field(default=8, metadata={"help": "Sequences scored together."})
    max_length: int | None = field(
        default=None,
        metadata={"help": "Tokens per sequence at most (longer ones are cut); None: no limit."},
    )

    def __post_init__(self):
        check_batch_size(self)
        if self.max_length is not None and self.max_length < 2:
            raise UserError(f"max_length must be at least 2, got {self.max_length}")


def lm_examples(path: str, limit: int | None = None) -> list:
    """Texts (`text` column) or prompt/completion pairs (any SFT format) to score."""
    from mlxpost.data import load_examples

    _, examples = load_examples(path, "sft")
    return examples[:limit] if limit else examples


def tokenize_for_perplexity(examples: list, tokenizer, max_length: int | None):
    """(TokenizedExamples, length report): a text counts every token but the first (nothing
    predicts it), a conversation its completion only, as SFT trains on them."""
    from mlxpost.data import TokenizeConfig, tokenize_examples

    config = TokenizeConfig(max_length=max_length, on_too_long="truncate", completion_only=True)
    return tokenize_examples(examples, tokenizer, config)


def scored_nll(backend: Backend, model, tokenized: list, pad_id: int, batch_size: int):
    """(summed NLL, counted tokens) over the loss masks, in length-sorted batches."""
    from mlxpost.data import pad_batch, pad_masks
    from mlxpost.functional import prediction_mask

    # Sorting by length keeps padding, hence wasted compute, small.
    order = np.argsort([len(t.input_ids) for t in tokenized], kind="stable")
    total, count = 0.0, 0
    with tqdm(
        total=len(order), desc="eval perplexity", unit="seq", file=sys.stderr, leave=False
    ) as bar:
        for start in range(0, len(order), batch_size):
            chunk = [tokenized[i] for i in order[start : start + batch_size]]
            ids, attention = pad_batch([t.input_ids for t in chunk], pad_id)
            mask = pad_masks([t.loss_mask for t in chunk]) * prediction_mask(attention)
            logprobs = backend.logprobs(model, ids, attention)
            total -= float(np.sum(logprobs.astype(np.float64) * mask))
            count += int(mask.sum())
            bar.update(len(chunk))
    return total, count


def evaluate_perplexity(
    backend: Backend, model, info: TokenizerInfo, examples: list, cfg: PerplexityConfig
) -> dict:
    """exp of the token-weighted mean NLL: every counted token weighs the same, so long
    examples count more than short ones."""
    tokenized, lengths = tokenize_for_perplexity(examples, info.tokenizer, cfg.max_length)
    total, count = scored_nll(backend, model, tokenized, info.pad_id, cfg.batch_size)
    if not count:
        raise UserError("no tokens to score: every example was dropped or has an empty completion")
    nll = total / count
    return {
        "task": "perplexity",
        "n": len(tokenized),
        "tokens": count,
        "nll": nll,
        "perplexity": float(np.exp(nll)),
        "truncated": lengths["truncated"],
        "dropped": lengths["dropped_prompt_too_long"],
        "max_length": cfg.max_length,
    }


# A generation whose 4-grams repeat more often than this is stuck in a loop.
LOOP_REPEAT_RATE = 0.3


@dataclass
class RepetitionConfig:
    max_new_tokens: int = field(
        default=128, metadata={"help": "Tokens generated per prompt at most."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (1: the model's own distribution)."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    top_k: int = field(default=0, metadata={"help": "Top-k when sampling (0: off)."})
    batch_size: int = field(default=64, metadata={"help": "Prompts generated together."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})

    def __post_init__(self):
        check_sampling(self)


def prompt_conversations(path: str, limit: int | None = None) -> list[list[dict]]:
    """The prompt messages of an SFT dataset (its completions are not used)."""
    from mlxpost.data import load_examples

    _, examples = load_examples(path, "sft")
    prompts = [ex.prompt_messages for ex in examples if ex.prompt_messages]
    if not prompts:
        raise UserError(f"{path}: no prompts (plain `text` rows have none to generate from)")
    return prompts[:limit] if limit else prompts


def ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def repeat_rate(words: list[str], n: int) -> float:
    """Share of a text's n-grams that repeat an earlier one, (total - unique) / total (rep-n of
    Welleck et al., 2019); 0 for a text shorter than n."""
    grams = ngrams(words, n)
    # Not 1 - unique / total: in floats that makes 3 repeats of 10 exceed a 0.3 threshold.
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def distinct(texts_words: list[list[str]], n: int) -> float:
    """Unique n-grams / all n-grams, pooled over every text (Li et al., 2016)."""
    grams = [gram for words in texts_words for gram in ngrams(words, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_metrics(texts: list[str]) -> dict:
    """Diversity and loop figures of generated texts, on whitespace-separated words.

    distinct_1/2: unique / total uni- and bigrams over all texts (higher: more varied).
    repeated_3gram_rate: mean over texts of the share of repeated 3-grams (lower is better).
    non_repetition: share of texts NOT stuck in a loop, a loop being a repeated-4-gram rate
    above LOOP_REPEAT_RATE (1: no text loops).
    """
    words = [text.split() for text in texts]
    looping = [repeat_rate(w, 4) > LOOP_REPEAT_RATE for w in words]
    return {
        "distinct_1": distinct(words, 1),
        "distinct_2": distinct(words, 2),
        "repeated_3gram_rate": float(np.mean([repeat_rate(w, 3) for w in words])) if words else 0.0,
        "non_repetition": 1.0 - float(np.mean(looping)) if words else 0.0,
        "mean_words": float(np.mean([len(w) for w in words])) if words else 0.0,
    }


def evaluate_repetition(
    backend: Backend,
    model,
    info: TokenizerInfo,
    prompts: list[list[dict]],
    cfg: RepetitionConfig,
) -> dict:
    """Sample one completion per prompt and measure how varied and loop-free they are."""
    out = generate_replies(backend, model, info, prompts, cfg, "eval repetition")
    report = {"task": "repetition", "n": len(prompts), **repetition_metrics(out.texts)}
    report["mean_completion_tokens"] = float(out.lengths.mean()) if prompts else 0.0
    report["truncated"] = float(np.mean(~out.finished)) if prompts else 0.0
    report["samples"] = [
        {"prompt": messages[-1]["content"], "completion": text}
        for messages, text in list(zip(prompts, out.texts))[:3]
    ]
    return report


@dataclass
class RewardEvalConfig:
    reward_model: str | None = field(
        default=None,
        metadata={"help": "Reward model directory: the final/ of an `mlxpost rm` run."},
    )
    max_new_tokens: int = field(
        default=128, metadata={"help": "Tokens generated per prompt at most."}
    )
    temperature: float = field(default=0.0, metadata={"help": "0: greedy decoding."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass when sampling."})
    top_k: int = field(default=0, metadata={"help": "Top-k when sampling (0: off)."})
    batch_size: int = field(default=64, metadata={"help": "Prompts generated together."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})

    def __post_init__(self):
        from mlxpost.reward_model import read_reward_model_info

        check_sampling(self)
        if not self.reward_model:
            raise UserError(
                "--task reward needs --reward-model DIR (final/ of an `mlxpost rm` run)"
            )
        read_reward_model_info(self.reward_model)  # fail before any model is loaded


def reward_examples(path: str, limit: int | None = None) -> list:
    """Preference pairs (chosen/rejected columns), scored as they are; or prompts to generate
    from (prompt or question columns, or the prompts of any SFT format)."""
    from mlxpost.data import load_records, normalise_records
    from mlxpost.data.formats import columns_of

    records = load_records(path)
    columns = set(columns_of(records))
    if {"chosen", "rejected"} <= columns:
        examples = normalise_records(records, "rm", path)[1]
    elif columns & {"prompt", "question"}:
        examples = [ex.prompt_messages for ex in normalise_records(records, "grpo", path)[1]]
    else:
        return prompt_conversations(path, limit)
    return examples[:limit] if limit else examples


def score_generations(
    backend: Backend, model, info: TokenizerInfo, prompts: list[list[dict]], scorer, cfg
) -> dict:
    """Generate one completion per prompt and score it with a reward model (`scorer`:
    mlxpost.reward_model.RewardModelScorer)."""
    out = generate_replies(backend, model, info, prompts, cfg, "eval reward")
    scores = scorer(prompts, out.texts) if prompts else np.zeros(0, np.float32)
    return {
        "task": "reward",
        "n": len(prompts),
        "source": "generations",
        "mean_score": float(scores.mean()) if prompts else 0.0,
        "score_std": float(scores.std()) if prompts else 0.0,
        "mean_completion_tokens": float(out.lengths.mean()) if prompts else 0.0,
        "truncated": float(np.mean(~out.finished)) if prompts else 0.0,
        "samples": [
            {"prompt": messages[-1]["content"], "completion": text, "score": float(score)}
            for messages, text, score in list(zip(prompts, out.texts, scores))[:3]
        ],
    }


def evaluate_reward(
    backend: Backend, model, info: TokenizerInfo, examples: list, cfg: RewardEvalConfig
) -> dict:
    """Mean reward-model score of the model's completions to prompts; on preference data,
    of the data's chosen and rejected completions, with the pairwise accuracy (the share of
    pairs whose chosen completion scores strictly higher)."""
    from mlxpost.reward_model import RewardModelScorer

    scorer = RewardModelScorer(backend, cfg.reward_model)
    if not examples or not hasattr(examples[0], "chosen_messages"):
        return score_generations(backend, model, info, examples, scorer, cfg)
    prompts = [ex.prompt_messages for ex in examples]
    chosen = scorer(prompts, [ex.chosen_messages for ex in examples])
    rejected = scorer(prompts, [ex.rejected_messages for ex in examples])
    return {
        "task": "reward",
        "n": len(examples),
        "source": "data",
        "mean_score": float(np.concatenate([chosen, rejected]).mean()),
        "chosen_mean_score": float(chosen.mean()),
        "rejected_mean_score": float(rejected.mean()),
        "pairwise_accuracy": float(np.mean(chosen > rejected)),
        "mean_margin": float(np.mean(chosen - rejected)),
    }
