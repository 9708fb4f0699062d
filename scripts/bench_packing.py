"""Tokens/s of SFT with and without --packing on the bundled model and instructions.

What is measured: LoRA SFT steps (rank 8, alpha 16, float32, the SFT loss
`nll_and_kl_loss`) through `Backend.train_step` on batches drawn as `mlxpost sft`
draws them (`mlxpost.algorithms.supervised.Batches`: the bundled
instructions, filtered and tokenised as sft does, at most --max-length tokens):

* ``unpacked``: --batch-size examples per step, right-padded to the longest one
  (rounded up to a multiple of 16, as sft does);
* ``packed``: --batch-size rows per step, each holding as many examples as fit in
  --max-length tokens (first-fit decreasing), so a step trains on more tokens;
* ``packed, same tokens``: packed rows, as many per step as carry about the
  tokens of an unpacked step, so the gain from dropping padding shows apart from
  the gain of a larger step.

tokens/s counts the non-padding tokens a step trains on (the tokens the model
reads; padding excluded) per second of the whole optimizer step (forward,
backward, clipping, AdamW). Each configuration has its own model and optimizer
and takes --warmup untimed steps; then the timed steps run round-robin, one step
of each configuration in turn, so load from other processes affects each alike.
Nothing is asserted; the figures depend on the machine, printed with them.

    python scripts/bench_packing.py                       # torch, 20 steps of 16
    python scripts/bench_packing.py --steps 50 --batch-size 8 --max-length 512
    python scripts/bench_packing.py --backend mlx --json packing.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the mlxpost and torch_backend packages


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="torch", choices=("torch", "mlx"))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    parser.add_argument("--batch-size", type=int, default=16, help="examples, or packed rows")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per packed row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    return parser.parse_args(argv)


def machine(backend: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "backend": backend,
    }
    if backend == "torch":
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return info


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.backend == "torch" and args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    from mlxpost.algorithms.supervised import Batches, load_tokenized, nll_and_kl_loss
    from mlxpost.assets import DATA, default_model
    from mlxpost.backend import LoraConfig, OptimConfig, get_backend
    from mlxpost.data import TokenizeConfig
    from mlxpost.tokenizer import load_tokenizer

    model_dir = default_model()
    info = load_tokenizer(model_dir)
    data = os.path.join(DATA, "instructions", "train.jsonl")
    examples = load_tokenized(
        data, "sft", info.tokenizer, TokenizeConfig(max_length=args.max_length), lambda _: None
    )

    unpacked = Batches(examples, args.batch_size, args.seed, info.pad_id)
    packed = Batches(
        examples, args.batch_size, args.seed, info.pad_id, packing=True, max_length=args.max_length
    )
    per_row = sum(len(ex.input_ids) for ex in examples) / packed.units
    timed = range(args.warmup, args.warmup + args.steps)
    per_step = np.mean([(unpacked.batch(s)["attention_mask"] > 0).sum() for s in timed])
    same_tokens = max(1, round(per_step / per_row))
    matched = Batches(
        examples, same_tokens, args.seed, info.pad_id, packing=True, max_length=args.max_length
    )
    configs = {
        f"unpacked, {args.batch_size} examples": unpacked,
        f"packed, {args.batch_size} rows": packed,
        f"packed, {same_tokens} rows (same tokens)": matched,
    }

    backend = get_backend(args.backend)
    optim = OptimConfig(learning_rate=1e-4, warmup_steps=0, total_steps=args.warmup + args.steps)
    runs = {}
    for name, batches in configs.items():
        model = backend.load_model(model_dir, "float32")
        backend.attach_lora(model, LoraConfig(rank=8, alpha=16.0), seed=args.seed)
        runs[name] = {
            "batches": batches,
            "model": model,
            "optimizer": backend.make_optimizer(model, optim),
            "seconds": 0.0,
            "tokens": 0,
            "slots": 0,
            "losses": [],
        }

    def step(run, number):
        batch = run["batches"].batch(number)
        start = time.perf_counter()
        metrics = backend.train_step(run["model"], run["optimizer"], nll_and_kl_loss, [batch])
        return time.perf_counter() - start, batch, metrics

    for number in range(args.warmup):
        for run in runs.values():
            step(run, number)
    for number in timed:
        for run in runs.values():
            seconds, batch, metrics = step(run, number)
            run["seconds"] += seconds
            run["tokens"] += int((batch["attention_mask"] > 0).sum())
            run["slots"] += int(batch["attention_mask"].size)
            run["losses"].append(float(metrics["loss"]))

    results = {}
    for name, run in runs.items():
        results[name] = {
            "tokens_per_second": run["tokens"] / run["seconds"],
            "seconds_per_step": run["seconds"] / args.steps,
            "tokens_per_step": run["tokens"] / args.steps,
            "padding_share": 1.0 - run["tokens"] / run["slots"],
            "rows_per_epoch": run["batches"].units,
            "final_loss": run["losses"][-1],
        }
    base = results[next(iter(results))]["tokens_per_second"]
    for figures in results.values():
        figures["ratio"] = figures["tokens_per_second"] / base

    about = machine(args.backend)
    print(
        f"bundled model, {len(examples)} instructions, {args.backend} backend, float32 LoRA r8, "
        f"max length {args.max_length}, {args.steps} timed steps after {args.warmup} warm-up"
    )
    print(", ".join(f"{k} {v}" for k, v in about.items()))
    header = f"{'configuration':<34} {'tokens/s':>9} {'ratio':>6} {'s/step':>7} {'tok/step':>9} {'padding':>8} {'rows/epoch':>10}"
    print(header)
    for name, f in results.items():
        print(
            f"{name:<34} {f['tokens_per_second']:>9.0f} {f['ratio']:>6.2f} "
            f"{f['seconds_per_step']:>7.3f} {f['tokens_per_step']:>9.0f} "
            f"{f['padding_share']:>8.1%} {f['rows_per_epoch']:>10}"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "machine": about, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
