"""Dataset filters: length, quality heuristics, exact and near duplicates.

Each filter takes normalised examples and returns (kept, report); the report
says how many it dropped and why, and the kept examples keep their order.
Everything is deterministic: no salted Python hashes, no sampling.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

WORD = re.compile(r"\w+")


def prompt_text(example) -> str:
    return "\n".join(message["content"] for message in example.prompt_messages)


def completion_texts(example) -> list[str]:
    """The text(s) a model is trained to produce: both sides of a preference pair."""
    if getattr(example, "text", None) is not None:
        return [example.text]
    sides = []
    for name in ("completion_messages", "chosen_messages", "rejected_messages"):
        messages = getattr(example, name, None)
        if messages is not None:
            sides.append("\n".join(message["content"] for message in messages))
    return sides


def example_text(example) -> str:
    return "\n".join([prompt_text(example)] + completion_texts(example))


def report(name: str, total: int, kept: int, reasons: dict, **settings) -> dict:
    return {
        "filter": name,
        "total": total,
        "kept": kept,
        "dropped": total - kept,
        "reasons": reasons,
        **settings,
    }


def filter_length(
    examples,
    min_chars: int | None = None,
    max_chars: int | None = None,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
    tokenizer=None,
):
    """Keep examples whose prompt + completion text is within the bounds (tokens need a
    tokenizer; they count the plain text, without a chat template)."""
    if (min_tokens is not None or max_tokens is not None) and tokenizer is None:
        raise ValueError("token bounds need a tokenizer")
    reasons = {"too_short": 0, "too_long": 0}
    kept = []
    for example in examples:
        text = example_text(example)
        sizes = [(len(text), min_chars, max_chars)]
        if tokenizer is not None:
            tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            sizes.append((tokens, min_tokens, max_tokens))
        if any(low is not None and size < low for size, low, _ in sizes):
            reasons["too_short"] += 1
        elif any(high is not None and size > high for size, _, high in sizes):
            reasons["too_long"] += 1
        else:
            kept.append(example)
    return kept, report("length", len(examples), len(kept), reasons)


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (0: none; near 1: a loop)."""
    words = WORD.findall(text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def alphanumeric_share(text: str) -> float:
    """Share of non-space characters that are letters or digits (1.0 for empty text)."""
    visible = [c for c in text if not c.isspace()]
    if not visible:
        return 1.0
    return sum(c.isalnum() for c in visible) / len(visible)


def filter_quality(examples, max_repeated_ngrams: float = 0.5, min_alphanumeric: float = 0.25):
    """Drop empty or whitespace completions, looping text (share of repeated word
    3-grams above `max_repeated_ngrams`) and mostly symbols (share of letters and
    digits below `min_alphanumeric`)."""
    reasons = {"empty_completion": 0, "repetitive": 0, "non_alphanumeric": 0}
    kept = []
    for example in examples:
        completions = completion_texts(example)
        if any(not text.strip() for text in completions):
            reasons["empty_completion"] += 1
        elif any(repeated_ngram_share(text) > max_repeated_ngrams for text in completions):
            reasons["repetitive"] += 1
        elif alphanumeric_share(example_text(example)) < min_alphanumeric:
            reasons["non_alphanumeric"] += 1
        else:
            kept.append(example)
    return kept, report("quality", len(examples), len(kept), reasons)


def normalise_text(text: str) -> str:
    return " ".join(text.lower().split())


def deduplicate(examples):
    """Drop repeats of an earlier example's prompt + completion, ignoring case and spacing."""
    seen = set()
    kept = []
    for example in examples:
        key = "\x00".join(
            normalise_text(t) for t in [prompt_text(example)] + completion_texts(example)
        )
        digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
        if digest not in seen:
            seen.add(digest)
            kept.append(example)
    return kept, report(
        "duplicates", len(examples), len(kept), {"exact_duplicate": len(examples) - len(kept)}
    )


# MinHash with the universal hashes (a x + b) mod p over 32-bit shingle hashes;
# p < 2^31 keeps a x + b below 2^63, so uint64 arithmetic never overflows.
PRIME = (1 << 31) - 1


def shingles(text: str, n: int = 3) -> set[int]:
    """32-bit hashes of the word n-grams (the whole text when it has fewer words)."""
    words = normalise_text(text).split()
    if not words:
        return set()
    size = min(n, len(words))
    grams = {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}
    return {
        int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "little") for g in grams
    }


def minhash(shingle_set: set[int], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    values = np.fromiter(shingle_set, dtype=np.uint64, count=len(shingle_set)) % PRIME
    return ((np.outer(a, values) + b[:, None]) % PRIME).min(axis=1)


def near_deduplicate(examples, threshold: float = 0.8, num_perm: int = 64, seed: int = 0):
    """Drop examples whose word 3-gram Jaccard similarity with an earlier kept one is at
    least `threshold`.

    MinHash signatures in bands (locality-sensitive hashing) find candidate
    pairs without comparing all of them; each candidate's exact Jaccard
    similarity then decides, so there are no false positives. Bands of 4 rows
    (2 below a threshold of 0.6) find pairs at the threshold with probability
    above 0.99 for the default 64 hashes.
    """
    rows = 4 if threshold >= 0.6 else 2
    bands = max(num_perm // rows, 1)
    rng = np.random.default_rng(seed)
    a = rng.integers(1, PRIME, size=bands * rows, dtype=np.uint64)
    b = rng.integers(0, PRIME, size=bands * rows, dtype=np.uint64)
    buckets: dict[tuple, list[int]] = {}
    kept_sets: list[set[int]] = []
    kept = []
    for example in examples:
        current = shingles(example_text(example))
        if not current:
            kept.append(example)  # nothing to compare; exact deduplication covers empty text
            continue
        signature = minhash(current, a, b)
        keys = [
            (band, signature[band * rows : (band + 1) * rows].tobytes()) for band in range(bands)
        ]
        candidates = {k for key in keys for k in buckets.get(key, ())}
        if any(jaccard(current, kept_sets[k]) >= threshold for k in sorted(candidates)):
            continue
        for key in keys:
            buckets.setdefault(key, []).append(len(kept_sets))
        kept_sets.append(current)
        kept.append(example)
    return kept, report(
        "near_duplicates",
        len(examples),
        len(kept),
        {"near_duplicate": len(examples) - len(kept)},
        threshold=threshold,
    )


def jaccard(first: set, second: set) -> float:
    return len(first & second) / len(first | second)


def apply_filters(examples, quality: bool = True, duplicates: bool = True, near: bool = True):
    """The default cleaning pipeline: (kept, [report per filter])."""
    reports = []
    steps = [(quality, filter_quality), (duplicates, deduplicate), (near, near_deduplicate)]
    for enabled, step in steps:
        if enabled:
            examples, step_report = step(examples)
            reports.append(step_report)
    return examples, reports
