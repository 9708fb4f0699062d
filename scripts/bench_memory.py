"""Peak memory of post-training at Gemma-2 2B's shapes, measured small and derived at full size.

What is measured. Random checkpoints with Gemma-2 2B's shapes (vocabulary 256,000, hidden
2304, intermediate 9216, 8 query and 4 key/value heads of 256, sliding window 4096, attention
and final soft-capping, tied embeddings) but 1 or 2 of its 26 layers. Each measurement runs in
a fresh process and reports its peak: MLX's allocator peak over the step, loaded weights
included (mx.get_peak_memory: the arrays, which a Mac's unified memory would hold alike),
torch's process high-water mark on this CPU (its resident set, so it includes the Python and
torch runtime and the load; malloc returns large blocks when freed, MALLOC_MMAP_THRESHOLD_).
Phases:

* ``sft``: one LoRA SFT step (rank 8 on every projection, AdamW) on 2 rows of T tokens;
* ``grpo``: one GRPO update on 2 rows of T tokens: the behaviour and reference logprob passes
  (no gradient) and the clipped-ratio loss with a KL term, entropy and its backward;
* ``sample``: 2 prompts of 32 tokens, 8 samples each sharing the prefill, M new tokens.

Options: ``before`` (the previous version's code, given with --before: the loss head on the
whole logits), ``whole`` (--logits-chunk 0), ``chunk`` (chunks of 16 positions, so that both
token counts run several; the default's extra memory over them is measured on the head alone
and added when deriving), ``chunk+ckpt`` (and --grad-checkpoint), ``chunk+ckpt+q4`` (and a
4-bit base; MLX only).

What is derived. In float32 at depths L in {1, 2} and two token counts N (MLX's GRPO step
three), each (backend, phase, option) is fitted by peak = a + b L + c N + d L N (exactly
through four points, by least squares through six): a fixed cost (the embedding,
the runtime, the loss head's chunk), b per layer (its weights), c per token (the head's
per-token share, embeddings' activations), d per layer and token (activations kept for the
backward). The full-size figure is that fit at L = 26 with bfloat16 weights: a and b lose the
float32 weights' bytes and gain bfloat16's (4-bit layers: MLX's 4-bit weights with bfloat16
scales and biases, 4.5 bits a weight), and c and d are scaled by the ratio of the per-token
slopes measured in bfloat16 and float32 at L = 1 (small runs: bfloat16 matmuls on this CPU run
at a few GFLOP/s), and the default chunk's extra memory is added. The real run: a GRPO step of 2 prompts x 8 completions x (128 + 256) tokens
(N = 6,144; sampling the same 16 rows) and an SFT step of 4 x 512 tokens (N = 2,048).

    python scripts/bench_memory.py --before ../old  # everything; ../old: a checkout of the
                                                    # version before chunking (else "before"
                                                    # is skipped); results in bench_memory.json
    python scripts/bench_memory.py --backends mlx   # one backend
    python scripts/bench_memory.py --report         # the tables from the saved results

Results are saved after each measurement and reused (delete the JSON to measure again).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.environ.get("MLXPOST_CODE", ROOT))  # the code measured

VOCAB, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 256_000, 2304, 9216, 8, 4, 256
REAL_LAYERS = 26
DEPTHS = (1, 2)
ROWS = 2
WIDTHS = (16, 48)  # tokens per row: N = 32 and 96
# GRPO is also measured at N = 256 (MLX): its real run has 3x SFT's tokens, and at N <= 96 the
# per-layer-and-token term is a few MB of difference, within the allocator's noise.
WIDE = {("mlx", "grpo"): 128}
# Chunks of 16 positions in the measured chunked runs, so that both token counts run several
# chunks (the default, 65 at this vocabulary, would leave the smaller batch in one); the
# default's extra chunk memory is measured apart on a narrow model with the same vocabulary
# (head_only_specs) and added when deriving.
MEASURED_CHUNK = 16
PROMPT, SAMPLES = 32, 8
NEW_TOKENS = (4, 12)  # sampling: N = 16 x (32 + M) = 576 and 704
GB = 2**30
# bfloat16 confirmation at L = 1: 2 rows (N = 32 and 64, both in several chunks)
SLOPE_WIDTHS = (16, 32)

OPTIONS = {
    # the loss head as it was before chunking: the previous version's code (--before DIR)
    "before": dict(chunk=0, ckpt=False, quantize=None, before=True),
    "whole": dict(chunk=0, ckpt=False, quantize=None),
    "chunk": dict(chunk=MEASURED_CHUNK, ckpt=False, quantize=None),
    "chunk+ckpt": dict(chunk=MEASURED_CHUNK, ckpt=True, quantize=None),
    "chunk+ckpt+q4": dict(chunk=MEASURED_CHUNK, ckpt=True, quantize=4),
}
# What is measured, in order: the figures the derivation needs first. A (backend, phase,
# option) stage measures the 2 x 2 grid of depths and token counts.
STAGES = [
    ("mlx", "sft", "before"),
    ("mlx", "sft", "chunk+ckpt"),
    "default chunk",
    "bfloat16 slopes",
    ("mlx", "sft", "chunk+ckpt+q4"),
    ("torch", "sft", "before"),
    ("torch", "sft", "chunk+ckpt"),
    ("mlx", "grpo", "chunk+ckpt"),
    ("mlx", "grpo", "chunk+ckpt+q4"),
    ("mlx", "sample", "chunk"),
    ("torch", "grpo", "chunk+ckpt"),
    ("torch", "sample", "chunk"),
    ("mlx", "sample", "chunk+ckpt+q4"),
    "bfloat16 slopes, 4-bit",
    ("mlx", "sft", "chunk"),
    ("mlx", "sft", "whole"),
    ("mlx", "grpo", "before"),
    ("torch", "sft", "chunk"),
    ("torch", "grpo", "before"),
]


# ---- checkpoints ----


def layer_weights() -> dict[str, tuple[int, ...]]:
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    return {
        "self_attn.q_proj.weight": (q, HIDDEN),
        "self_attn.k_proj.weight": (kv, HIDDEN),
        "self_attn.v_proj.weight": (kv, HIDDEN),
        "self_attn.o_proj.weight": (HIDDEN, q),
        "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
        "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        "input_layernorm.weight": (HIDDEN,),
        "post_attention_layernorm.weight": (HIDDEN,),
        "pre_feedforward_layernorm.weight": (HIDDEN,),
        "post_feedforward_layernorm.weight": (HIDDEN,),
    }


def build_checkpoint(directory: str, layers: int) -> str:
    """A Gemma-2 2B-shaped checkpoint with `layers` layers of random float32 weights."""
    if os.path.exists(os.path.join(directory, "model.safetensors")):
        return directory
    from safetensors.numpy import save_file
    from transformers import Gemma2Config

    os.makedirs(directory, exist_ok=True)
    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        sliding_window=4096,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=256,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    config.save_pretrained(directory)
    rng = np.random.default_rng(layers)
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN), np.float32) * 0.02,
        "model.norm.weight": np.zeros(HIDDEN, np.float32),
    }
    for i in range(layers):
        for name, shape in layer_weights().items():
            value = (
                np.zeros(shape, np.float32)
                if name.endswith("layernorm.weight")
                else rng.standard_normal(shape, np.float32) * 0.02
            )
            tensors[f"model.layers.{i}.{name}"] = value
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    return directory


# ---- one measurement (a fresh process) ----


def measure(spec: dict) -> dict:
    from mlxpost.algorithms.grpo import GRPOConfig, grpo_loss
    from mlxpost.algorithms.supervised import nll_and_kl_loss
    from mlxpost.backend import LoraConfig, OptimConfig, SamplingConfig, get_backend
    from mlxpost.functional import prediction_mask

    option = OPTIONS[spec["option"]]
    backend = get_backend(spec["backend"])
    backend.seed(0)
    started = time.perf_counter()
    model = backend.load_model(spec["path"], spec["dtype"], quantize=option["quantize"])
    backend.attach_lora(model, LoraConfig(rank=8, alpha=16.0), seed=0)
    if not option.get("before"):
        backend.set_logits_chunk(model, spec.get("chunk", option["chunk"]))
        backend.set_grad_checkpoint(model, option["ckpt"])
    loaded = backend.peak_memory_gb()
    if spec["backend"] == "mlx":
        # The step's peak, not the load's: converting a float32 checkpoint to bfloat16 or
        # quantizing it holds both copies for a moment, which a bfloat16 or mlx-lm-quantized
        # checkpoint would not. The loaded weights stay active, so they count.
        import mlx.core as mx

        mx.reset_peak_memory()
    rng = np.random.default_rng(0)
    rows, width = spec["rows"], spec["width"]
    phase = spec["phase"]
    if phase == "sample":
        prompts = rng.integers(3, VOCAB, size=(2, PROMPT)).tolist()
        cfg = SamplingConfig(max_new_tokens=spec["new_tokens"], temperature=1.0, n=SAMPLES)
        backend.sample(model, prompts, cfg, eos_ids=[1], pad_id=0, seed=0)
    else:
        ids = rng.integers(3, VOCAB, size=(rows, width))
        mask = np.ones_like(ids)
        loss_mask = prediction_mask(mask).astype(np.float32)
        loss_mask[:, : width // 3] = 0  # a prompt
        batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}
        optimizer = backend.make_optimizer(model, OptimConfig(warmup_steps=0, total_steps=1))
        if phase == "sft":
            backend.train_step(model, optimizer, nll_and_kl_loss, [batch])
        else:
            from functools import partial

            from mlxpost.backend import adapter_disabled

            batch["old_logprobs"] = backend.logprobs(model, ids, mask) * loss_mask
            with adapter_disabled(backend, model):
                batch["ref_logprobs"] = backend.logprobs(model, ids, mask) * loss_mask
            batch["advantages"] = np.linspace(-1, 1, rows).astype(np.float32)
            batch["normaliser"] = np.float32(loss_mask.sum())
            loss = partial(grpo_loss, cfg=GRPOConfig(kl_beta=0.04))
            backend.train_step(model, optimizer, loss, [batch])
    import resource

    return {
        **spec,
        "peak_gb": backend.peak_memory_gb(),
        "after_load_gb": loaded,
        "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,
        "seconds": time.perf_counter() - started,
    }


def key(spec: dict) -> str:
    fields = ("backend", "phase", "option", "dtype", "layers", "rows", "width", "new_tokens")
    extra = f"/chunk{spec['chunk']}" if "chunk" in spec else ""
    extra += "/slope" if spec.get("slope") else ""
    return "/".join(str(spec.get(f)) for f in fields) + extra


def run_one(spec: dict, results: dict, path: str, before: str | None) -> dict | None:
    name = key(spec)
    if name in results:
        return results[name]
    code = ROOT
    if OPTIONS[spec["option"]].get("before"):
        if not before:
            print(f"  {name}: skipped (no --before checkout)")
            return None
        code = before
    env = dict(os.environ, PYTHONPATH=code, MLXPOST_CODE=code)
    # glibc's malloc keeps freed blocks above its (rising) mmap threshold in the heap, so the
    # resident high-water mark would count memory torch already gave back; a fixed threshold
    # returns every large block to the system when freed.
    env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--measure", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    results[name] = result
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    print(f"  {name}: peak {result['peak_gb']:.2f} GB ({result['seconds']:.0f} s)", flush=True)
    return result


def grid(backend: str, phase: str, option: str, checkpoints: dict) -> list[dict]:
    specs = []
    for layers in DEPTHS:
        base = dict(backend=backend, phase=phase, option=option, dtype="float32")
        base.update(layers=layers, path=checkpoints[layers], rows=ROWS)
        if phase == "sample":
            specs += [dict(base, width=PROMPT, new_tokens=m) for m in NEW_TOKENS]
        else:
            widths = (*WIDTHS, WIDE[backend, phase]) if (backend, phase) in WIDE else WIDTHS
            specs += [dict(base, width=w, new_tokens=0) for w in widths]
    return specs


def slope_specs(checkpoints: dict, option: str) -> list[dict]:
    """bfloat16 against float32 at L = 1, 2 rows: the per-token slope (MLX, SFT step)."""
    return [
        dict(backend="mlx", phase="sft", option=option, dtype=dtype, layers=1)
        | dict(path=checkpoints[1], rows=2, width=width, new_tokens=0, slope=True)
        for dtype in ("float32", "bfloat16")
        for width in SLOPE_WIDTHS
    ]


def head_only_specs(directory: str) -> list[dict]:
    """The loss head alone: a Gemma-2-shaped checkpoint 64 wide with the full vocabulary, one
    SFT step on 8 x 129 tokens with chunks of 16 and of the default, per backend: the default
    chunk's extra memory over chunks of 16."""
    path = build_narrow_checkpoint(directory)
    return [
        dict(backend=backend, phase="sft", option="chunk+ckpt", dtype="float32", layers=1)
        | dict(path=path, rows=8, width=129, new_tokens=0, chunk=chunk)
        for backend in ("mlx", "torch")
        for chunk in (MEASURED_CHUNK, None)
    ]


def build_narrow_checkpoint(directory: str) -> str:
    if not os.path.exists(os.path.join(directory, "config.json")):
        from transformers import Gemma2Config, Gemma2ForCausalLM

        config = Gemma2Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            tie_word_embeddings=True,
        )
        Gemma2ForCausalLM(config).save_pretrained(directory)
    return directory


# ---- fitting and deriving ----


def tokens(r: dict) -> int:
    if r["phase"] == "sample":
        return 2 * SAMPLES * (PROMPT + r["new_tokens"])
    return r["rows"] * r["width"]


def fit(points: list[dict]) -> tuple[np.ndarray, float]:
    """(a, b, c, d) of peak = a + b L + c N + d L N, in bytes: through the four points, or by
    least squares through more; and the largest residual (0 for four points)."""
    design = np.array([[1.0, r["layers"], tokens(r), r["layers"] * tokens(r)] for r in points])
    peaks = np.array([r["peak_gb"] * GB for r in points])
    coef = np.linalg.lstsq(design, peaks, rcond=None)[0]
    return coef, float(np.abs(design @ coef - peaks).max())


def weight_bytes(dtype_bytes: float, quantized: bool, float32_scales: bool) -> tuple[float, float]:
    """(embedding, one layer's frozen weights) in bytes. 4-bit layers: 4 bits a weight plus a
    scale and a bias per 64 in the model dtype (float32 when measured, bfloat16 when derived)."""
    embedding = VOCAB * HIDDEN * dtype_bytes
    shapes = layer_weights().values()
    linear = sum(int(np.prod(s)) for s in shapes if len(s) == 2)
    norms = sum(int(np.prod(s)) for s in shapes if len(s) == 1) * dtype_bytes
    if quantized:
        scale_bytes = 4 if float32_scales else 2
        return embedding, linear * (0.5 + 2 * scale_bytes / 64) + norms
    return embedding, linear * dtype_bytes + norms


def slope_ratio(results: dict, option: str) -> float | None:
    """bfloat16 / float32 per-token slope of `option` at L = 1 (measured pairs)."""
    slopes = {}
    for dtype in ("float32", "bfloat16"):
        pair = [
            r
            for r in results.values()
            if r.get("slope") and r["option"] == option and r["dtype"] == dtype
        ]
        if len(pair) != 2:
            return None
        low, high = sorted(pair, key=tokens)
        slopes[dtype] = (high["peak_gb"] - low["peak_gb"]) / (tokens(high) - tokens(low))
    return slopes["bfloat16"] / slopes["float32"] if slopes["float32"] > 0 else None


def default_chunk_extra(results: dict, backend: str) -> float | None:
    """Bytes the default chunk adds to the measured chunk's peak (MLX or torch, measured)."""
    pair = {
        r["chunk"]: r["peak_gb"] * GB
        for r in results.values()
        if r["backend"] == backend and "chunk" in r and not r.get("slope")
    }
    if set(pair) != {MEASURED_CHUNK, None}:
        return None
    return max(0.0, pair[None] - pair[MEASURED_CHUNK])


def derive(coef: np.ndarray, option: str, layers: int, n: int, ratio: float) -> float:
    """The fit at `layers` and `n` tokens with bfloat16 weights (see the module's doc)."""
    a, b, c, d = coef
    quantized = OPTIONS[option]["quantize"] is not None
    e32, w32 = weight_bytes(4, quantized, True)
    e16, w16 = weight_bytes(2, quantized, False)
    return (a - e32 + e16) + (b - w32 + w16) * layers + ratio * (c + d * layers) * n


REAL = {"sft": 4 * 512, "grpo": 16 * (128 + 256), "sample": 16 * (128 + 256)}


def report(results: dict) -> str:
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; measured "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        "Measured (float32, GB): peak per configuration at L layers and N tokens.",
        "",
    ]
    groups: dict[tuple, list] = {}
    for r in results.values():
        if r["dtype"] == "float32" and "chunk" not in r and not r.get("slope"):
            groups.setdefault((r["backend"], r["phase"], r["option"]), []).append(r)
    header = "| backend | phase | option | " + " | ".join(f"L={L}: peak (N)" for L in DEPTHS)
    lines += [header + " |", "|" + " --- |" * (3 + len(DEPTHS))]
    for (backend, phase, option), points in sorted(groups.items()):
        cells = [
            ", ".join(
                f"{r['peak_gb']:.2f} ({tokens(r)})"
                for r in sorted(points, key=tokens)
                if r["layers"] == layers
            )
            for layers in DEPTHS
        ]
        lines.append(f"| {backend} | {phase} | {option} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Fitted (from the measured points above; MB): peak = a + b L + c N + d L N.",
        "",
        "| backend | phase | option | a (fixed) | b (per layer) | c (per token) | "
        "d (per layer and token) | largest residual |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    fits = {}
    for group, points in sorted(groups.items()):
        if len(points) < 4 or len({r["layers"] for r in points}) < 2:
            continue
        coef, residual = fit(points)
        fits[group] = coef
        a, b, c, d = coef / 2**20
        lines.append(
            f"| {' | '.join(group)} | {a:,.0f} | {b:,.0f} | {c:.3f} | {d:.4f} | "
            f"{residual / 2**20:.0f} |"
        )
    lines += ["", "Per-token cost at depth 0 (c, the loss head's share), against the code before:"]
    for backend in ("mlx", "torch"):
        base = fits.get((backend, "sft", "before"))
        for option in ("whole", "chunk", "chunk+ckpt"):
            coef = fits.get((backend, "sft", option))
            if base is not None and coef is not None:
                lines.append(
                    f"- {backend} sft {option}: {coef[2] / 2**20:.3f} MB a token against "
                    f"{base[2] / 2**20:.3f} before: {base[2] / coef[2]:.1f}x less"
                )
    ratios = {o: slope_ratio(results, o) for o in ("chunk+ckpt", "chunk+ckpt+q4")}
    lines += ["", "bfloat16 / float32 per-token slope at L = 1 (measured, chunks of 16):"]
    for option, ratio in ratios.items():
        lines.append(
            f"- {option}: {ratio:.2f}" if ratio is not None else f"- {option}: not measured"
        )
    extras = {b: default_chunk_extra(results, b) for b in ("mlx", "torch")}
    lines += [
        "",
        "The default chunk's extra memory over chunks of 16 (measured on the head alone, MB):",
    ]
    for backend, extra in extras.items():
        lines.append(
            f"- {backend}: " + (f"{extra / 2**20:,.0f}" if extra is not None else "not measured")
        )
    lines += [
        "",
        "Derived: the real run, 26 layers, bfloat16 weights, the default chunk (GB). The",
        "slope ratio used is the option's own where measured, else chunk+ckpt's; sampling's",
        "per-token cost is scaled like the others'. A 4-bit base changes the weights, not the",
        "activations, so the last column also derives it with the unquantized option's d (the",
        "larger of the two): where the fitted d is within the measurement's noise it says how",
        "much that noise could matter at 26 layers.",
        "",
        "| backend | phase | option | tokens | derived peak | with the unquantized d |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (backend, phase, option), coef in sorted(fits.items()):
        ratio = ratios.get(option) or ratios.get("chunk+ckpt")
        if ratio is None:
            continue
        extra = extras[backend] or 0.0
        if phase == "sample" or OPTIONS[option]["chunk"] != MEASURED_CHUNK:
            extra = 0.0
        peak = derive(coef, option, REAL_LAYERS, REAL[phase], ratio) + extra
        unquantized = fits.get((backend, phase, option.removesuffix("+q4")))
        bound = ""
        if option.endswith("+q4") and unquantized is not None:
            coef = np.array([*coef[:3], max(coef[3], unquantized[3])])
            bound = f"{(derive(coef, option, REAL_LAYERS, REAL[phase], ratio) + extra) / GB:.1f}"
        lines.append(
            f"| {backend} | {phase} | {option} | {REAL[phase]:,} | {peak / GB:.1f} | {bound} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--backends", default="mlx,torch")
    parser.add_argument("--json", default="bench_memory.json")
    parser.add_argument("--checkpoints", default="/tmp/mlxpost-bench-memory")
    parser.add_argument("--no-slopes", action="store_true", help="skip the bfloat16 runs")
    parser.add_argument("--phases", default="sft,grpo,sample", help="phases to measure")
    parser.add_argument(
        "--before", help="a checkout of the version before chunking, for the 'before' option"
    )
    parser.add_argument("--report", action="store_true", help="only print the tables")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    results = {}
    if os.path.exists(args.json):
        with open(args.json, encoding="utf-8") as f:
            results = json.load(f)
    if not args.report:
        checkpoints = {
            layers: build_checkpoint(os.path.join(args.checkpoints, f"gemma2-2b-{layers}"), layers)
            for layers in DEPTHS
        }
        backends = args.backends.split(",")
        for stage in STAGES:
            if stage == "default chunk":
                specs = head_only_specs(os.path.join(args.checkpoints, "gemma2-narrow"))
            elif stage == "bfloat16 slopes":
                specs = [] if args.no_slopes else slope_specs(checkpoints, "chunk+ckpt")
            elif stage == "bfloat16 slopes, 4-bit":
                specs = [] if args.no_slopes else slope_specs(checkpoints, "chunk+ckpt+q4")
            elif stage[1] in args.phases.split(","):
                specs = grid(*stage, checkpoints)
            else:
                specs = []
            specs = [spec for spec in specs if spec["backend"] in backends]
            if specs:
                print(" ".join(stage) if isinstance(stage, tuple) else stage, flush=True)
            for spec in specs:
                run_one(spec, results, args.json, args.before)
    print(report(results))


if __name__ == "__main__":
    main()
