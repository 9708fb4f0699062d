"""Preference pairs from a model's own samples (rejection-sampled, on-policy DPO data).

For each prompt the model samples n completions; the reward functions of
mlxpost.rewards score them; the best and the worst make one pair when their
rewards differ by at least `min_gap`. Prompts whose samples all score alike
give no pair. Ties go to the earliest sample, so a seed gives one file.
"""

from __future__ import annotations

import numpy as np


def best_and_worst(rewards: np.ndarray, min_gap: float) -> list[tuple[int, int, int]]:
    """(prompt, best sample, worst sample) for each row of (P, n) rewards whose spread
    reaches min_gap."""
    pairs = []
    for prompt, row in enumerate(rewards):
        best, worst = int(np.argmax(row)), int(np.argmin(row))
        if row[best] - row[worst] >= min_gap and row[best] > row[worst]:
            pairs.append((prompt, best, worst))
    return pairs


def sample_pairs(
    backend, model, info, examples, reward_set, sampling, min_gap: float, seed: int, warn
):
    """Preference records {prompt, chosen, rejected, chosen_reward, rejected_reward} and
    counts, from sampling.n completions per example (PromptExample from the data pipeline)."""
    from mlxpost.generation import encode_prompt, generate

    prompts = [encode_prompt(info.tokenizer, ex.prompt_messages) for ex in examples]
    out = generate(backend, model, info, prompts, sampling, seed=seed, desc="sampling")
    n = sampling.n
    source = np.repeat(np.arange(len(examples)), n)
    columns = {key: [examples[i].extras.get(key) for i in source] for key in examples[0].extras}
    decoded = [info.tokenizer.decode(p) for p in prompts]  # once per prompt, not per sample
    prompt_texts = [decoded[i] for i in source]
    totals, metrics = reward_set.score(prompt_texts, out.texts, columns, warn)
    rewards = totals.reshape(len(examples), n)
    records = [
        {
            "prompt": examples[p].prompt_messages,
            "chosen": out.texts[p * n + best],
            "rejected": out.texts[p * n + worst],
            "chosen_reward": float(rewards[p, best]),
            "rejected_reward": float(rewards[p, worst]),
        }
        for p, best, worst in best_and_worst(rewards, min_gap)
    ]
    stats = {
        "prompts": len(examples),
        "samples": len(out.texts),
        "pairs": len(records),
        "mean_reward": float(totals.mean()) if len(totals) else 0.0,
        **metrics,
    }
    return records, stats
