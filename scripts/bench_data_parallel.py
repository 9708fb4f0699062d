"""Data-parallel throughput: `mlxpost sft` on 1 rank and under a launcher on N ranks.

    python scripts/bench_data_parallel.py [--backend torch|mlx] [--ranks 2] [--model DIR]
        [--steps 20] [--batch-size 16] [--max-length 256]

Runs the same global batch (LoRA, float32, no evaluation) with 1 rank (plain python) and
with N ranks (torchrun --standalone, or mlx.launch --backend ring on this host), each rank
with OMP_NUM_THREADS = --threads (1: one core per rank), and prints the training tokens/s of each (summary.json's
tokens_per_second: the global batch's tokens over rank 0's step time; the median of
--repeats alternated runs) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(backend: str, ranks: int) -> list[str]:
    python = [sys.executable, "-m", "mlxpost.cli"]
    if ranks == 1:
        return python
    bin_dir = Path(sys.executable).parent
    if backend == "torch":
        launcher = [str(bin_dir / "torchrun"), "--standalone", f"--nproc_per_node={ranks}"]
        return [*launcher, "-m", "mlxpost.cli"]
    return [str(bin_dir / "mlx.launch"), "-n", str(ranks), "--backend", "ring", "--", *python]


def tokens_per_second(args, ranks: int, output: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    options = [
        "sft",
        "--backend",
        args.backend,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--eval-every",
        "0",
        "--eval-math",
        "0",
        "--eval-text",
        "0",
        "--data",
        args.data,
        "--eval-data",
        args.eval_data,
        "--save-every",
        "0",
        "--output",
        output,
    ]
    if args.model:
        options += ["--model", args.model]
    result = subprocess.run(
        [*command(args.backend, ranks), *options], env=env, capture_output=True, text=True
    )
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    with open(os.path.join(output, "summary.json")) as f:
        return json.load(f)["tokens_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch", choices=("torch", "mlx"))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each; medians shown.")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each rank.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        # 512 training examples and one held-out: only the steps are timed
        args.data, args.eval_data = (
            os.path.join(root, "train.jsonl"),
            os.path.join(root, "eval.jsonl"),
        )
        for name, path, lines in (("train", args.data, 512), ("test", args.eval_data, 1)):
            with open(ROOT / f"mlxpost/assets/data/math/{name}.jsonl") as f:
                Path(path).write_text("".join(f.readline() for _ in range(lines)))
        runs: dict[int, list[float]] = {1: [], args.ranks: []}
        for repeat in range(args.repeats):  # alternated, so a change in load hits both
            for ranks in runs:
                output = os.path.join(root, f"{ranks}-{repeat}")
                runs[ranks].append(tokens_per_second(args, ranks, output))
        one, many = (statistics.median(runs[r]) for r in runs)
    print(
        json.dumps(
            {
                "backend": args.backend,
                "cores": os.cpu_count(),
                "global_batch": args.batch_size,
                "threads_per_rank": args.threads,
                "tokens_per_second": {"1": round(one), str(args.ranks): round(many)},
                "speedup": round(many / one, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
