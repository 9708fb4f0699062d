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
    args = parser.parse_args(argv)
    with open(os.path.join(args.model, "config.json")) as f:
        vocab = int(json.load(f)["vocab_size"])
    rng = np.random.default_rng(args.seed)
    prompts = [[int(t) for t in rng.integers(2, vocab, 16)] for _ in range(args.prompts)]
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
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['model']} {report['shape']} load {report['load_average']}")
        for name, rates in report["tokens_per_second"].items():
            cells = ", ".join(f"{tool} {rate:,.0f} tokens/s" for tool, rate in rates.items())
            print(f"{name}: {cells}; mlxpost {report['ratio'][name]:.2f}x")
    return report


if __name__ == "__main__":
    main()
