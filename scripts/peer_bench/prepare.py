"""The workers that run before any tool: the models and data every tool trains on, and the
matmul that calibrates each framework's peak FLOP/s."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time

import numpy as np

from .measuring import read_jsonl, torch_setup
from .plan import ROOT, Plan


def build_models(names: list[str], root: str, seed: int) -> dict[str, str]:
    """name -> checkpoint directory (Hugging Face layout)."""
    sys.path.insert(0, ROOT)
    from mlxpost import assets

    paths = {}
    if "tiny" in names:
        paths["tiny"] = assets.DEFAULT_MODEL
    if "gpt2-124m" in names:
        sys.path.insert(0, os.path.join(ROOT, "scripts"))
        import bench  # scripts/bench.py: builds the 124M-shaped model with random weights

        built = bench.build_models(["gpt2-124m"], root, seed)["gpt2-124m"]
        copy_tokenizer(assets.DEFAULT_MODEL, built)  # the bundled one: the same ids for both
        paths["gpt2-124m"] = built
    return paths


def copy_tokenizer(source: str, target: str) -> None:
    """The tokenizer files of checkpoint `source` into `target`, replacing those it has."""
    from mlxpost.loop import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        path = os.path.join(target, name)
        if os.path.exists(path):
            os.remove(path)
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), path)


def convert_for_mlx_lm(source: str, target: str) -> str:
    """A copy mlx-lm can load: original GPT-2 key names (no `transformer.` prefix, no separate
    lm_head: it is tied) and `n_ctx` in config.json. The weights are the same."""
    from safetensors.numpy import load_file, save_file

    os.makedirs(target, exist_ok=True)
    weights = load_file(os.path.join(source, "model.safetensors"))
    renamed = {}
    for key, value in weights.items():
        if key == "lm_head.weight":
            continue
        renamed[key.removeprefix("transformer.")] = value
    save_file(renamed, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    config.setdefault("n_ctx", config["n_positions"])
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    copy_tokenizer(source, target)
    return target


def build_data(model_dir: str, root: str, plans: list[Plan]) -> dict[str, str]:
    """The token stream (SFT), equal-length prompts (GRPO) and long pairs (DPO), from the
    bundled data, rendered with the model's chat template."""
    sys.path.insert(0, ROOT)
    from transformers import AutoTokenizer

    from mlxpost import assets

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(messages, generation_prompt=False) -> list[int]:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    os.makedirs(root, exist_ok=True)
    out = {}
    need = max(p.sft_batch * p.sft_seq_len * (p.warmup + p.steps) for p in plans)
    stream: list[int] = []
    for ex in read_jsonl(assets.default_data("sft")):
        stream += encode(
            [
                {"role": "user", "content": ex["question"]},
                {"role": "assistant", "content": ex["answer"]},
            ]
        )
        if len(stream) >= need:
            break
    out["sft_stream"] = os.path.join(root, "sft_stream.npy")
    np.save(out["sft_stream"], np.asarray(stream, np.int32))

    prompts = read_jsonl(assets.default_data("grpo"))
    lengths = [len(encode(ex["prompt"], True)) for ex in prompts]
    common = max(set(lengths), key=lengths.count)
    chosen = [ex for ex, n in zip(prompts, lengths) if n == common]
    out["grpo_prompts"] = os.path.join(root, "grpo_prompts.jsonl")
    out["grpo_prompt_length"] = common
    with open(out["grpo_prompts"], "w") as f:
        for ex in chosen:
            f.write(json.dumps({"prompt": ex["prompt"], "answer": ex.get("answer", "")}) + "\n")

    # DPO: for each row length L, pairs whose prompt leaves at least 8 completion tokens and
    # whose chosen and rejected conversations both exceed L + 1 tokens (cut to L by every tool)
    rendered = []
    for ex in read_jsonl(assets.default_data("dpo")):
        prompt = [{"role": "user", "content": ex["prompt"]}]
        chosen_msgs = [{"role": "assistant", "content": ex["chosen"]}]
        rejected_msgs = [{"role": "assistant", "content": ex["rejected"]}]
        pair = {"prompt": prompt, "chosen": chosen_msgs, "rejected": rejected_msgs}
        full = min(len(encode(prompt + chosen_msgs)), len(encode(prompt + rejected_msgs)))
        rendered.append((pair, len(encode(prompt, True)), full))
    out["dpo_pairs"], out["dpo_pair_count"] = {}, {}
    for length in sorted({p.dpo_length for p in plans}):
        pairs = [
            pair for pair, p_len, full in rendered if p_len <= length - 8 and full > length + 1
        ]
        out["dpo_pairs"][str(length)] = os.path.join(root, f"dpo_pairs_{length}.jsonl")
        out["dpo_pair_count"][str(length)] = len(pairs)
        with open(out["dpo_pairs"][str(length)], "w") as f:
            for pair in pairs:
                f.write(json.dumps(pair) + "\n")
    return out


def worker_prepare(spec: dict) -> dict:
    """Every model's checkpoint (and mlx-lm copy), config.json and data files."""
    root = spec["root"]
    paths = build_models(spec["models"], os.path.join(root, "models"), spec["seed"])
    configs, mlx_paths, data = {}, {}, {}
    for model in spec["models"]:
        with open(os.path.join(paths[model], "config.json")) as f:
            configs[model] = json.load(f)
        if model in spec["mlx_lm_models"]:
            mlx_paths[model] = convert_for_mlx_lm(
                paths[model], os.path.join(root, "models", f"{model}-mlx-lm")
            )
        plans = [Plan(**p) for p in spec["plans"][model]]
        data[model] = build_data(paths[model], os.path.join(root, "data", model), plans)
    return {
        "status": "ok",
        "paths": paths,
        "mlx_paths": mlx_paths,
        "configs": configs,
        "data": data,
    }


def worker_matmul(spec: dict) -> dict:
    """The best and median FLOP/s of a float32 `size`-square matmul in one framework."""
    n, reps = int(spec["size"]), 10
    flops = 2.0 * n**3
    times = []
    if spec["tool"] == "torch":
        torch = torch_setup(spec)
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm up
        for _ in range(reps):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        info = {
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
        }
    else:
        import mlx.core as mx

        a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
        mx.eval(a, b, a @ b)
        reps = 4
        for _ in range(reps):
            start = time.perf_counter()
            mx.eval(a @ b)
            times.append(time.perf_counter() - start)
        info = {"device": str(mx.default_device())}
    return {
        "status": "ok",
        "size": n,
        "seconds": times,
        "flops": flops / min(times),
        "median_flops": flops / statistics.median(times),
        **info,
    }
