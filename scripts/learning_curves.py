"""Learning curves of several runs side by side: a markdown table and one PNG.

Reads each run directory's metrics.jsonl, keeps the steps where the metric was
evaluated, and prints a table (one column per run) with each run's median
step_seconds; with --png, draws the curves on one chart.

    python scripts/learning_curves.py runs/grpo-torch runs/grpo-mlx runs/ppo \\
        --metric math_accuracy --png docs/figures/rl_math_accuracy.png
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def read_curve(run_dir: str, metric: str) -> tuple[dict[int, float], float | None]:
    """{step: value} where the metric was logged, and the median step_seconds (runs logged
    before step_seconds existed: the mean, from their tokens and tokens_per_second)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"{run_dir}: no metrics.jsonl")
    curve, seconds, tokens, rate, steps = {}, [], 0.0, None, 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if metric in record:
                curve[int(record["step"])] = float(record[metric])
            if "step_seconds" in record:
                seconds.append(float(record["step_seconds"]))
            if "tokens_per_second" in record:
                tokens += float(record.get("tokens", 0.0))
                rate, steps = float(record["tokens_per_second"]), steps + 1
    if not curve:
        raise SystemExit(f"{run_dir}: metrics.jsonl has no {metric!r}")
    if seconds:
        return curve, float(np.median(seconds))
    return curve, tokens / rate / steps if rate else None


def markdown(
    curves: dict[str, dict[int, float]], seconds: dict, metric: str, every: int = 1
) -> str:
    names = list(curves)
    steps = sorted({s for curve in curves.values() for s in curve})
    steps = [s for i, s in enumerate(steps) if i == 0 or s % every == 0]
    lines = [
        f"| step | {' | '.join(names)} |",
        f"| --- | {' | '.join('---' for _ in names)} |",
    ]
    for step in steps:
        cells = [f"{curves[n][step]:.3f}" if step in curves[n] else "" for n in names]
        lines.append(f"| {step} | {' | '.join(cells)} |")
    timing = [f"{seconds[n]:.2f}" if seconds[n] is not None else "n/a" for n in names]
    lines.append(f"| s/step | {' | '.join(timing)} |")
    return f"{metric}\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (name=DIR to label one)")
    parser.add_argument("--metric", default="math_accuracy")
    parser.add_argument("--png", default=None, help="write the curves to this PNG file")
    parser.add_argument(
        "--every", type=int, default=1, help="table rows: steps divisible by N, and the first"
    )
    args = parser.parse_args()
    curves, seconds = {}, {}
    for entry in args.runs:
        name, _, directory = entry.rpartition("=")
        name = name or os.path.basename(os.path.normpath(directory))
        curves[name], seconds[name] = read_curve(directory, args.metric)
    print(markdown(curves, seconds, args.metric, args.every))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, curve in curves.items():
            steps = sorted(curve)
            ax.plot(steps, [curve[s] for s in steps], marker="o", markersize=3, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(args.metric)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
