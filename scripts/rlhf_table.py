"""PPO runs by evaluation step: reward-model score, KL, length, math accuracy, critic figures.

For each run directory, one markdown table: at each evaluated step the reward model's mean
score of the held-out greedy completions, their math accuracy and mean length (tokens),
and, averaged over the training steps since the previous evaluation, the KL per sequence
of the rollouts, the KL coefficient and the rollouts' length. Then the critic's explained
variance over the last --last steps (median and quartiles).

    python scripts/rlhf_table.py runs/ppo-rm-kl02 runs/ppo-rm-kl05 runs/ppo-rm-kladapt
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

EVAL_COLUMNS = [
    ("eval_reward_model_score", "RM score (held-out)", "{:+.2f}"),
    ("math_accuracy", "math accuracy", "{:.3f}"),
    ("eval_completion_length", "greedy length", "{:.1f}"),
]
TRAIN_COLUMNS = [
    ("sequence_kl", "KL / sequence", "{:.2f}"),
    ("kl_coef", "KL coef", "{:.3f}"),
    ("completion_length", "rollout length", "{:.1f}"),
]


def read(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"{run_dir}: no metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def table(rows: list[dict]) -> str:
    evals = [r for r in rows if "math_accuracy" in r]
    eval_columns = [c for c in EVAL_COLUMNS if any(c[0] in r for r in evals)]
    header = [name for _, name, _ in eval_columns + TRAIN_COLUMNS]
    lines = [f"| step | {' | '.join(header)} |", f"| --- |{' --- |' * len(header)}"]
    previous = 0
    for row in evals:
        step = int(row["step"])
        cells = [form.format(row[key]) if key in row else "" for key, _, form in eval_columns]
        window = [r for r in rows if previous < r["step"] <= step and "sequence_kl" in r]
        for key, _, form in TRAIN_COLUMNS:
            values = [r[key] for r in window if key in r]
            cells.append(form.format(np.mean(values)) if values else "")
        lines.append(f"| {step} | {' | '.join(cells)} |")
        previous = step
    return "\n".join(lines)


def critic(rows: list[dict], last: int) -> str:
    values = [r["explained_variance"] for r in rows if "explained_variance" in r][-last:]
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return "explained variance: none logged"
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return (
        f"explained variance, last {len(values)} steps: median {median:.2f} "
        f"(quartiles {q1:.2f}, {q3:.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--last", type=int, default=20, help="steps of the critic's figures")
    args = parser.parse_args()
    for run_dir in args.runs:
        rows = read(run_dir)
        print(f"{run_dir}\n\n{table(rows)}\n\n{critic(rows, args.last)}\n")


if __name__ == "__main__":
    main()
