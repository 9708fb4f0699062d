"""Sampling throughput of mlxpost's samplers against the frameworks' own batched generation.

For one model directory and one shape (``--prompts`` random prompts of 16 tokens, ``--samples``
samples each, ``--new-tokens`` tokens per sample, temperature 1.0, no top-k/top-p, no row
stopping early), it times on each chosen backend:

* torch: ``Backend.sample`` against transformers' ``generate`` (do_sample, min_new_tokens =
  max_new_tokens, num_return_sequences = samples, the same prompts);
* mlx: ``Backend.sample`` against mlx-lm's ``batch_generate`` (each prompt repeated
  ``--samples`` times, EOS switched off; a GPT-2 checkpoint is given to mlx-lm as a converted
  copy with the same weights, as scripts/bench_peers.py does).

Each call runs once untimed, then ``--repeats`` times timed; tokens/s = generated tokens /
median seconds, the prompt prefill included. Ratios are only meaningful within one run on one
machine: print the load with them.

Speed of light (``--no-speed-of-light`` skips it), for the same shape, from two figures
measured in the same run and the checkpoint's sizes:

* compute: FLOPs per generated token = 2 N + 4 L S_kv d_kv, with N the weights a token is
  multiplied with (every 2-D weight but the embedding tables, plus the head: the tied table
  counts once as the head), L layers, d_kv = key/value heads x head dim, S_kv the mean number
  of cache slots a query reads (prompt + (new + 1) / 2); over the framework's best float32
  ``--matmul-size`` square matmul (FLOP/s);
* memory: bytes a decode step must read = the weights once (4 N, float32) + every row's
  keys and values (2 L S_kv d_kv x 4); over the best read bandwidth of a 256 MiB float32 sum;
* a step takes at least the larger of the two, so the speed of light in tokens/s is
  rows / max(compute seconds, memory seconds) (rows = prompts x samples). The prefill and
  the sampling arithmetic are left out, which only makes it higher.

    python scripts/bench_sampling.py --model DIR --backends torch --prompts 8 --samples 8 --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

NEVER_EOS = -1
PROMPT_TOKENS = 16
PAD_ID = 0


def timed(fn, repeats: int) -> float:
    fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def bench_torch(model_dir: str, prompts: list[list[int]], samples: int, tokens: int, repeats: int):
    import torch

    from mlxpost.backend import SamplingConfig, get_backend

    backend = get_backend("torch")
    model = backend.load_model(model_dir)
    cfg = SamplingConfig(max_new_tokens=tokens, temperature=1.0, n=samples)
    ours = timed(lambda: backend.sample(model, prompts, cfg, [NEVER_EOS], PAD_ID, 0), repeats)
    ids = torch.tensor(prompts, device=backend.device)

    def generate():
        with torch.no_grad():
            model.module.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                top_k=0,
                top_p=1.0,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                num_return_sequences=samples,
                pad_token_id=PAD_ID,
            )

    return {"mlxpost": ours, "transformers generate": timed(generate, repeats)}


def mlx_lm_copy(model_dir: str) -> str:
    """model_dir itself, or for GPT-2 a converted copy (same weights) in a temporary folder:
    mlx-lm reads GPT-2 only in the original key layout with n_ctx in config.json."""
    with open(os.path.join(model_dir, "config.json")) as f:
        if json.load(f).get("model_type") != "gpt2":
            return model_dir
    import tempfile

    from peer_bench.prepare import convert_for_mlx_lm  # scripts/ is on sys.path

    return convert_for_mlx_lm(model_dir, tempfile.mkdtemp(prefix="mlx-lm-gpt2-"))


def bench_mlx(model_dir: str, prompts: list[list[int]], samples: int, tokens: int, repeats: int):
    import importlib

    from mlx_lm import load
    from mlx_lm.sample_utils import make_sampler

    from mlxpost.backend import SamplingConfig, get_backend

    backend = get_backend("mlx")
    model = backend.load_model(model_dir)
    cfg = SamplingConfig(max_new_tokens=tokens, temperature=1.0, n=samples)
    ours = timed(lambda: backend.sample(model, prompts, cfg, [NEVER_EOS], PAD_ID, 0), repeats)
    generate = importlib.import_module("mlx_lm.generate")  # the module, not the function
    lm, tokenizer = load(mlx_lm_copy(model_dir))
    tokenizer._eos_token_ids = set()  # every row generates `tokens` tokens, as ours do
    rows = [p for p in prompts for _ in range(samples)]
    sampler = make_sampler(temp=1.0)
    theirs = timed(
        lambda: generate.batch_generate(lm, tokenizer, rows, max_tokens=tokens, sampler=sampler),
        repeats,
    )
    return {"mlxpost": ours, "mlx-lm batch_generate": theirs}


def model_cost(model_dir: str) -> dict:
    """Matmul weights N, layers and key/value width of a checkpoint, read from its config.json
    and the tensor shapes in its safetensors files (one or several shards)."""
    import glob

    from safetensors import safe_open

    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    config = config.get("text_config", config)

    def first(*keys):
        return next(config[k] for k in keys if config.get(k) is not None)

    layers = first("num_hidden_layers", "n_layer")
    heads = first("num_attention_heads", "n_head")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or first("hidden_size", "n_embd") // heads
    matmul, table, head = 0, 0, False
    shapes = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with safe_open(path, "np") as f:
            shapes.update({name: f.get_slice(name).get_shape() for name in f.keys()})
    for name, shape in shapes.items():
        if len(shape) != 2:
            continue
        if any(part in name for part in ("wte", "wpe", "embed")):
            if "wpe" not in name and "embed_positions" not in name:
                table = shape[0] * shape[1]  # the token table: the head when tied
            continue
        head = head or name.endswith("lm_head.weight")
        matmul += shape[0] * shape[1]
    return {
        "matmul_weights": matmul + (0 if head else table),
        "layers": layers,
        "kv_width": kv_heads * head_dim,
    }


def peak_matmul(framework: str, size: int = 1024, repeats: int = 10) -> float:
    """Best float32 size x size matmul FLOP/s of one framework."""
    if framework == "torch":
        import torch

        a, b = torch.randn(size, size), torch.randn(size, size)

        def run():
            torch.mm(a, b)
    else:
        import mlx.core as mx

        a, b = mx.random.normal((size, size)), mx.random.normal((size, size))
        mx.eval(a, b)

        def run():
            mx.eval(a @ b)

    run()
    best = min(timed_once(run) for _ in range(repeats))
    return 2 * size**3 / best


def read_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Best bytes/s of a float32 sum over `mib` MiB (each element read once)."""
    import torch

    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    return x.numel() * 4 / min(timed_once(x.sum) for _ in range(repeats))


def timed_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speed_of_light(cost: dict, prompt: int, rows: int, tokens: int, flops: float, bw: float):
    """The figures of the module docstring's speed of light, for one framework."""
    slots = prompt + (tokens + 1) / 2  # mean cache slots a decode query reads
    kv = 2 * cost["layers"] * slots * cost["kv_width"]  # keys and values per row per step
    flops_per_token = 2 * cost["matmul_weights"] + 2 * kv
    compute = rows * flops_per_token / flops
    memory = (4 * cost["matmul_weights"] + rows * 4 * kv) / bw
    return {
        "flops_per_token": flops_per_token,
        "matmul_flops": flops,
        "read_bytes_per_second": bw,
        "step_compute_seconds": compute,
        "step_memory_seconds": memory,
        "tokens_per_second": rows / max(compute, memory),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--backends", default="torch", help="comma separated: torch,mlx")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="timed calls (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--no-speed-of-light", dest="light", action="store_false", help="skip the bound"
    )
    args = parser.parse_args(argv)
    with open(os.path.join(args.model, "config.json")) as f:
        vocab = int(json.load(f)["vocab_size"])
    rng = np.random.default_rng(args.seed)
    prompts = [[int(t) for t in rng.integers(2, vocab, PROMPT_TOKENS)] for _ in range(args.prompts)]
    generated = args.prompts * args.samples * args.new_tokens
    runners = {"torch": bench_torch, "mlx": bench_mlx}
    report = {
        "model": args.model,
        "shape": f"{args.prompts}x{args.samples}x{args.new_tokens}",
        "load_average": os.getloadavg(),
        "tokens_per_second": {},
        "ratio": {},
    }
    for name in args.backends.split(","):
        seconds = runners[name](args.model, prompts, args.samples, args.new_tokens, args.repeats)
        rates = {tool: generated / s for tool, s in seconds.items()}
        report["tokens_per_second"][name] = rates
        (peer,) = [tool for tool in rates if tool != "mlxpost"]
        report["ratio"][name] = rates["mlxpost"] / rates[peer]
    if args.light:
        cost = model_cost(args.model)
        bandwidth = read_bandwidth()
        rows = args.prompts * args.samples
        report["speed_of_light"] = {
            name: speed_of_light(
                cost, PROMPT_TOKENS, rows, args.new_tokens, peak_matmul(name), bandwidth
            )
            for name in report["tokens_per_second"]
        }
        for name, bound in report["speed_of_light"].items():
            bound["mlxpost_share"] = (
                report["tokens_per_second"][name]["mlxpost"] / bound["tokens_per_second"]
            )
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['model']} {report['shape']} load {report['load_average']}")
        for name, rates in report["tokens_per_second"].items():
            cells = ", ".join(f"{tool} {rate:,.0f} tokens/s" for tool, rate in rates.items())
            print(f"{name}: {cells}; mlxpost {report['ratio'][name]:.2f}x")
        for name, bound in report.get("speed_of_light", {}).items():
            print(
                f"{name} speed of light: {bound['flops_per_token'] / 1e6:.1f} MFLOP/token, "
                f"matmul {bound['matmul_flops'] / 1e9:.0f} GFLOP/s, read "
                f"{bound['read_bytes_per_second'] / 1e9:.1f} GB/s; a step needs "
                f"{bound['step_compute_seconds'] * 1e3:.2f} ms of compute, "
                f"{bound['step_memory_seconds'] * 1e3:.2f} ms of reads: "
                f"{bound['tokens_per_second']:,.0f} tokens/s; mlxpost reaches "
                f"{100 * bound['mlxpost_share']:.0f}%"
            )
    return report


if __name__ == "__main__":
    main()
