"""Throughput benchmark: training and sampling tokens/s for the mlx and torch backends.

What is measured, for each model and each installed backend (float32 throughout):

* ``lora-train``: LoRA training steps (rank 8, alpha 16, the architecture's
  default target modules) through ``Backend.train_step`` with
  ``mlxpost.functional.nll_loss`` on one random batch of ``batch_size x seq_len``
  token ids (no padding). A step is the whole optimizer step: forward, backward,
  gradient clipping and AdamW. After ``--warmup`` untimed steps, ``--steps``
  steps are timed; tokens/s = batch_size * seq_len * steps / seconds (every
  input token counts, including the first of each row, which has no target).
* ``full-train``: the same without LoRA (every weight trained), for the tiny
  models only.
* ``sample``: ``Backend.sample`` on the LoRA model, ``--prompts`` random prompts
  of 16 tokens with ``--samples`` samples each, temperature 1.0, no top-k/top-p
  and an EOS id (-1) that never occurs, so every row generates
  ``--new-tokens`` tokens. One short untimed call warms up, then one call is
  timed; tokens/s = generated tokens / seconds, the prompt prefill included.

Models are built into a temporary directory with random weights by
``scripts/build_tiny_models.py`` (which needs torch and transformers):
``tiny-gpt2`` and ``tiny-gemma2`` with that script's defaults, and ``gpt2-124m``,
a GPT-2 with the real 124M shape (n_embd 768, 12 layers, 12 heads, vocab 50257,
1024 positions).

MLX on gpt2-124m runs a smaller plan (fewer steps, batch 1, shorter sequences,
fewer samples and tokens) because the MLX Linux CPU build is far slower than
torch there; the torch backend then also runs that smaller plan, so the
mlx/torch ratios compare equal shapes. Ratios are reported only for rows with
matching shapes. Both backends return host values from ``train_step`` and
``sample`` (the MLX backend evaluates its graph inside), so the clock
(``time.perf_counter``) stops after the work is done. Nothing is asserted about
speed; the figures depend heavily on the machine (thread counts, BLAS,
``LD_PRELOAD``), which is printed with them.

Run:

    python scripts/bench.py                          # both backends, all models
    python scripts/bench.py --backends torch --models tiny-gpt2 --steps 20
    python scripts/bench.py --json bench.json        # also write the figures
    python scripts/bench.py --torch-threads 1        # steadier torch figures on a busy machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the mlxpost and torch_backend packages
sys.path.insert(0, os.path.join(ROOT, "scripts"))  # build_tiny_models

from mlxpost.backend import (  # noqa: E402
    BackendUnavailable,
    LoraConfig,
    OptimConfig,
    SamplingConfig,
    get_backend,
)
from mlxpost.functional import nll_loss, prediction_mask  # noqa: E402

PROMPT_LEN = 16
NEVER_EOS = -1  # no token id is negative, so no row stops early
PAD_ID = 0
FIRST_ORDINARY_ID = 3  # ids 0..2 are <pad>, <eos>, <bos> in the built models

# name -> (architecture, build_tiny_models.build overrides, tiny?)
MODELS = {
    "tiny-gpt2": ("gpt2", {}, True),
    "tiny-gemma2": ("gemma2", {}, True),
    "gpt2-124m": (
        "gpt2",
        dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
        False,
    ),
}


@dataclass
class Plan:
    """The shapes one (model, backend) pair is measured at."""

    batch_size: int
    seq_len: int
    steps: int
    warmup: int
    prompts: int
    samples: int
    new_tokens: int
    note: str = ""

    def train_shape(self) -> str:
        return f"{self.batch_size}x{self.seq_len}"

    def sample_shape(self) -> str:
        return f"{self.prompts}x{self.samples}x{self.new_tokens}"


@dataclass
class Row:
    model: str
    backend: str
    mode: str
    shape: str  # train: batch x seq_len; sample: prompts x samples x new tokens
    steps: int  # timed train steps; 1 sampling call
    tokens: int
    seconds: float
    tokens_per_s: float
    note: str = ""
    extra: dict = field(default_factory=dict)


def reduced_plan(plan: Plan) -> Plan:
    """The smaller plan for MLX on gpt2-124m (MLX CPU is far slower than torch here)."""
    return replace(
        plan,
        batch_size=1,
        seq_len=min(plan.seq_len, 32),
        steps=min(plan.steps, 2),
        warmup=min(plan.warmup, 1),
        prompts=min(plan.prompts, 2),
        samples=min(plan.samples, 2),
        new_tokens=min(plan.new_tokens, 16),
        note="reduced plan (MLX CPU is slow at 124M)",
    )


def plans_for(model: str, backend: str, base: Plan, backends: list[str]) -> list[Plan]:
    if MODELS[model][2]:
        return [base]
    if backend == "mlx":
        return [reduced_plan(base)]
    plans = [base]
    if "mlx" in backends:  # the same shapes as MLX, so the ratio compares like with like
        plans.append(replace(reduced_plan(base), note="MLX's reduced plan, for the ratio"))
    return plans


def random_batch(rng: np.random.Generator, vocab: int, batch: int, seq_len: int) -> dict:
    input_ids = rng.integers(FIRST_ORDINARY_ID, vocab, size=(batch, seq_len), dtype=np.int64)
    attention_mask = np.ones((batch, seq_len), dtype=np.int32)
    return {
        "input_ids": input_ids.astype(np.int32),
        "attention_mask": attention_mask,
        "loss_mask": prediction_mask(attention_mask),
    }


def vocab_size(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json")) as f:
        return int(json.load(f)["vocab_size"])


def bench_train(backend, model_dir: str, plan: Plan, lora: bool, seed: int) -> tuple[Row, object]:
    """Time plan.steps train steps after plan.warmup untimed ones; returns the row and model."""
    backend.seed(seed)
    model = backend.load_model(model_dir)
    if lora:
        backend.attach_lora(model, LoraConfig(rank=8), seed=seed)
    trainable, total = backend.parameter_count(model)
    optimizer = backend.make_optimizer(
        model, OptimConfig(learning_rate=1e-4, warmup_steps=0, total_steps=10_000, min_lr_ratio=0.0)
    )
    rng = np.random.default_rng(seed)
    batch = random_batch(rng, vocab_size(model_dir), plan.batch_size, plan.seq_len)
    for _ in range(plan.warmup):
        backend.train_step(model, optimizer, nll_loss, [batch])
    step_seconds = []
    start = time.perf_counter()
    for _ in range(plan.steps):
        step_start = time.perf_counter()
        metrics = backend.train_step(model, optimizer, nll_loss, [batch])  # host floats
        step_seconds.append(time.perf_counter() - step_start)
    seconds = time.perf_counter() - start
    tokens = plan.batch_size * plan.seq_len * plan.steps
    row = Row(
        model="",
        backend=backend.name,
        mode="lora-train" if lora else "full-train",
        shape=plan.train_shape(),
        steps=plan.steps,
        tokens=tokens,
        seconds=seconds,
        tokens_per_s=tokens / seconds,
        note=plan.note,
        extra={
            "trainable_params": int(trainable),
            "total_params": int(total),
            "final_loss": float(metrics["loss"]),
            "warmup_steps": plan.warmup,
            "step_seconds": step_seconds,
        },
    )
    return row, model


def bench_sample(backend, model, model_dir: str, plan: Plan, seed: int) -> Row:
    rng = np.random.default_rng(seed + 1)
    vocab = vocab_size(model_dir)
    prompts = rng.integers(FIRST_ORDINARY_ID, vocab, size=(plan.prompts, PROMPT_LEN)).tolist()
    cfg = SamplingConfig(max_new_tokens=plan.new_tokens, temperature=1.0, n=plan.samples)
    warm_cfg = replace(cfg, max_new_tokens=min(2, plan.new_tokens))
    backend.sample(model, prompts, warm_cfg, [NEVER_EOS], PAD_ID, seed)
    start = time.perf_counter()
    samples = backend.sample(model, prompts, cfg, [NEVER_EOS], PAD_ID, seed)  # numpy arrays
    seconds = time.perf_counter() - start
    tokens = int(np.asarray(samples.completion_mask).sum())
    expected = plan.prompts * plan.samples * plan.new_tokens
    note = plan.note
    if tokens != expected:
        note = f"{note}; generated {tokens} of {expected} tokens".lstrip("; ")
    return Row(
        model="",
        backend=backend.name,
        mode="sample",
        shape=plan.sample_shape(),
        steps=1,
        tokens=tokens,
        seconds=seconds,
        tokens_per_s=tokens / seconds,
        note=note,
        extra={"prompt_len": PROMPT_LEN, "temperature": 1.0},
    )


def failed_row(model: str, backend: str, mode: str, shape: str, err: Exception) -> Row:
    return Row(
        model, backend, mode, shape, 0, 0, float("nan"), float("nan"), f"FAILED: {err!r}"[:200]
    )


def bench_model(backend, name: str, model_dir: str, plan: Plan, seed: int) -> list[Row]:
    rows: list[Row] = []

    def log(row: Row) -> None:
        row.model = name
        rows.append(row)
        print(
            f"  {name:<12} {row.backend:<6} {row.mode:<10} {row.shape:<10} "
            f"{row.tokens_per_s:>10.1f} tok/s  {row.seconds:7.2f} s",
            file=sys.stderr,
            flush=True,
        )

    model = None
    try:
        row, model = bench_train(backend, model_dir, plan, lora=True, seed=seed)
        log(row)
    except Exception as err:  # report and carry on with the other measurements
        log(failed_row(name, backend.name, "lora-train", plan.train_shape(), err))
    try:
        if model is None:
            model = backend.load_model(model_dir)
            backend.attach_lora(model, LoraConfig(rank=8), seed=seed)
        log(bench_sample(backend, model, model_dir, plan, seed))
    except Exception as err:
        log(failed_row(name, backend.name, "sample", plan.sample_shape(), err))
    del model
    if MODELS[name][2]:
        try:
            row, _ = bench_train(backend, model_dir, plan, lora=False, seed=seed)
            log(row)
        except Exception as err:
            log(failed_row(name, backend.name, "full-train", plan.train_shape(), err))
    return rows


def build_models(names: list[str], root: str, seed: int) -> dict[str, str]:
    try:
        from build_tiny_models import build
        from transformers.utils import logging as hf_logging
    except ImportError as err:
        raise SystemExit(
            f"building the benchmark models needs torch and transformers ({err})"
        ) from err
    hf_logging.disable_progress_bar()
    paths = {}
    for name in names:
        arch, overrides, _ = MODELS[name]
        start = time.perf_counter()
        paths[name] = build(arch, os.path.join(root, name), seed=seed, **overrides)
        print(f"built {name} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return paths


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return "unknown"


def machine_info(backends: dict, load_before: str) -> dict:
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "LD_PRELOAD": os.environ.get("LD_PRELOAD") or "not set",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or "not set",
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
    except ImportError:
        info["torch_threads"] = "torch not installed"
    for name, backend in backends.items():
        info[f"{name}_backend"] = backend.describe()
    return info


def ratios(rows: list[Row]) -> list[dict]:
    """mlx/torch tokens/s for each (model, mode, shape) both backends measured."""
    by_key = {(r.model, r.mode, r.shape, r.backend): r for r in rows if r.tokens}
    out = []
    for (model, mode, shape, backend), mlx_row in by_key.items():
        torch_row = by_key.get((model, mode, shape, "torch"))
        if backend != "mlx" or torch_row is None:
            continue
        out.append(
            {
                "model": model,
                "mode": mode,
                "shape": shape,
                "mlx_tokens_per_s": mlx_row.tokens_per_s,
                "torch_tokens_per_s": torch_row.tokens_per_s,
                "mlx_over_torch": mlx_row.tokens_per_s / torch_row.tokens_per_s,
            }
        )
    return out


def _finite(values: dict) -> dict:
    """NaN (a failed measurement) as null, so the JSON file is standard JSON."""
    return {k: None if isinstance(v, float) and v != v else v for k, v in values.items()}


def table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells):
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def report(info: dict, rows: list[Row], ratio_rows: list[dict], notes: list[str]) -> str:
    parts = ["Machine"]
    parts += [f"  {k}: {v}" for k, v in info.items()]
    if notes:
        parts += ["", "Notes"] + [f"  {n}" for n in notes]
    parts += [
        "",
        "Throughput (train shape: batch x seq_len; sample shape: prompts x samples x new tokens)",
        table(
            ["model", "backend", "mode", "shape", "steps", "tokens", "seconds", "tokens/s", "note"],
            [
                [
                    r.model,
                    r.backend,
                    r.mode,
                    r.shape,
                    str(r.steps),
                    str(r.tokens),
                    f"{r.seconds:.2f}",
                    f"{r.tokens_per_s:,.1f}",
                    r.note,
                ]
                for r in rows
            ],
            right={4, 5, 6, 7},
        ),
    ]
    if ratio_rows:
        parts += [
            "",
            "mlx / torch (same model, mode and shape; >1 means mlx is faster)",
            table(
                ["model", "mode", "shape", "mlx tok/s", "torch tok/s", "mlx/torch"],
                [
                    [
                        r["model"],
                        r["mode"],
                        r["shape"],
                        f"{r['mlx_tokens_per_s']:,.1f}",
                        f"{r['torch_tokens_per_s']:,.1f}",
                        f"{r['mlx_over_torch']:.3f}",
                    ]
                    for r in ratio_rows
                ],
                right={3, 4, 5},
            ),
        ]
    return "\n".join(parts)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", default="mlx,torch", help="comma separated: mlx,torch")
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma separated, from: {', '.join(MODELS)}"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed train steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed train steps first")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per sampling call")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch.set_num_threads(N) before measuring (0: torch's default)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    for name in ("steps", "batch_size", "seq_len", "prompts", "samples", "new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.seq_len < 2:
        parser.error("--seq-len must be at least 2 (a token needs a predecessor)")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    load_before = load_average()
    notes: list[str] = []
    backends = {}
    for name in args.backends:
        try:
            backends[name] = get_backend(name)
        except (BackendUnavailable, ValueError) as err:
            notes.append(f"skipped backend {name}: {err}")
            print(f"skipping backend {name}: {err}", file=sys.stderr, flush=True)
    if not backends:
        raise SystemExit("no backend available; " + "; ".join(notes))
    if args.torch_threads > 0 and "torch" in backends:
        import torch

        torch.set_num_threads(args.torch_threads)
        notes.append(f"torch threads set to {args.torch_threads} (--torch-threads)")

    base = Plan(
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        steps=args.steps,
        warmup=args.warmup,
        prompts=args.prompts,
        samples=args.samples,
        new_tokens=args.new_tokens,
    )
    if "gpt2-124m" in args.models and "mlx" in backends:
        small = reduced_plan(base)
        notes.append(
            f"mlx on gpt2-124m uses a reduced plan: train {small.train_shape()} x "
            f"{small.steps} steps ({small.warmup} warmup), sample {small.sample_shape()}; "
            "torch runs it too so the ratios compare equal shapes"
        )
    notes.append(
        "sampling: prompts of 16 random tokens, temperature 1.0, EOS id -1 (never "
        "sampled), the LoRA model; tokens/s includes the prompt prefill"
    )

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="mlxpost-bench-") as root:
        paths = build_models(args.models, root, args.seed)
        for model in args.models:
            for name, backend in backends.items():
                for plan in plans_for(model, name, base, list(backends)):
                    rows.extend(bench_model(backend, model, paths[model], plan, args.seed))

    info = machine_info(backends, load_before)
    if "mlx" in backends and not os.environ.get("LD_PRELOAD"):
        notes.append(
            "LD_PRELOAD is not set: the MLX Linux CPU build uses its own reference BLAS; "
            "preloading an optimised BLAS (e.g. Debian's libopenblas) makes it faster"
        )
    notes.append(
        "other processes competing for the CPUs (see load average) slow torch's "
        "multi-threaded kernels a lot; step_seconds in --json shows the spread"
    )
    ratio_rows = ratios(rows)
    wall = time.perf_counter() - wall_start
    print(report(info, rows, ratio_rows, notes))
    print(f"\nwall time: {wall:.1f} s")
    if args.json:
        payload = {
            "machine": info,
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "notes": notes,
            "results": [_finite(asdict(r)) for r in rows],
            "ratios": ratio_rows,
            "wall_seconds": wall,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
