"""Bad input ends with exit status 2 and one clear line, and loses nothing (DESIGN.md).

Every case runs `python -m mlxpost.cli ARGV` in its own fresh directory ({work}) and checks:
the exit status; that stderr has exactly one non-empty line, `error: ...`, containing the
case's message; that no traceback is printed; that every file under {work} before the run
(what `setup` made, and anything the command must not touch) is byte-identical after it;
and that the shared fixtures are untouched.

A case is one `Case(...)` in CASES:

    Case(
        id,        # pytest id, unique: "<command or area>-<what is wrong>"
        argv,      # the arguments after `mlxpost`, split on spaces (or a list of them);
                   #   "{name}" is filled with a path:
                   #   {work} the case's directory (also the working directory of the run),
                   #   or a shared fixture: {model} (the bundled GPT-2), {gemma} (a tiny
                   #   Gemma-2), {adapter} (rank-4 LoRA on {model}'s c_attn), {adapter8}
                   #   (rank 8), {adapter_proj} (rank 4 on c_proj), {math} (bundled math
                   #   test split), {prompts} (bundled RL prompts)
        message,   # a substring the error line must contain (placeholders filled too)
        setup=..., # optional callable(work: Path) creating or corrupting files in {work};
                   #   helpers below: model_dir, adapter_dir, write, write_jsonl
        code=2,    # expected exit status (3: training stopped on NaN or inf)
        seconds=,  # optional: the run must end within this (e.g. no network retries)
        xfail=,    # optional reason: a known gap, fixed outside the files under test
        progress=, # True: progress lines (model loaded, a reward's own traceback) may come
                   #   first; the error is then the last line and the only `error:` one
        absent=,   # paths under {work} that must not exist afterwards (no stale run)
    )

Most cases fail before a backend is imported (about half a second each); those that need
one use the MLX backend, which imports in milliseconds, or, few, torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mlxpost.assets import DATA, DEFAULT_MODEL

MATH = os.path.join(DATA, "math", "test.jsonl")
PROMPTS = os.path.join(DATA, "rl", "prompts.jsonl")
BUNDLED_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass
class Case:
    id: str
    argv: str | list[str]
    message: str
    setup: Callable[[Path], None] | None = None
    code: int = 2
    seconds: float | None = None
    xfail: str | None = None
    progress: bool = False
    absent: tuple[str, ...] = ()


# --------------------------------------------------------------------------- file helpers


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(row) + "\n" for row in rows))


def model_dir(
    work: Path, name: str = "model", config: dict | None = None, files: dict | None = None
) -> Path:
    """A copy of the bundled model (files linked, not copied) with config.json keys changed
    (None deletes a key) and `files` replaced: {name: bytes or text, or None to leave out}."""
    files = dict(files or {})
    if config:
        values = json.loads(Path(DEFAULT_MODEL, "config.json").read_text())
        for key, value in config.items():
            if value is None:
                values.pop(key, None)
            else:
                values[key] = value
        files["config.json"] = json.dumps(values)
    target = work / name
    target.mkdir(parents=True)
    for entry in os.listdir(DEFAULT_MODEL):
        if entry not in files:
            os.symlink(os.path.join(DEFAULT_MODEL, entry), target / entry)
    for entry, content in files.items():
        if content is not None:
            write(target / entry, content)
    return target


def bundled(name: str) -> bytes:
    """A file of the bundled model."""
    return Path(DEFAULT_MODEL, name).read_bytes()


def adapter_dir(
    work: Path,
    name: str = "adapter",
    config: dict | None = None,
    weights: dict[str, np.ndarray] | None = None,
    rank: int = 4,
    target: str = "c_attn",
) -> Path:
    """A PEFT adapter for the bundled GPT-2 (4 layers, 256 wide); config keys changed as in
    model_dir; `weights` replaces the tensors (keys without the PEFT prefix)."""
    from mlxpost.adapters import save_adapter
    from mlxpost.backend import LoraConfig

    out = {"c_attn": 768, "c_proj": 256}[target]
    if weights is None:
        rng = np.random.default_rng(0)
        weights = {}
        for layer in range(4):
            path = f"transformer.h.{layer}.attn.{target}"
            weights[f"{path}.lora_A.weight"] = rng.normal(size=(rank, 256)).astype(np.float32)
            weights[f"{path}.lora_B.weight"] = rng.normal(size=(out, rank)).astype(np.float32)
    cfg = LoraConfig(rank=rank, alpha=2.0 * rank, targets=(target,))
    directory = work / name
    save_adapter(str(directory), weights, cfg, (target,), "gpt2", DEFAULT_MODEL)
    if config:
        path = directory / "adapter_config.json"
        values = json.loads(path.read_text())
        for key, value in config.items():
            if value is None:
                values.pop(key, None)
            else:
                values[key] = value
        path.write_text(json.dumps(values))
    return directory


GEMMA_CONFIG = {
    "model_type": "gemma2",
    "vocab_size": 1024,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "intermediate_size": 32,
    "max_position_embeddings": 64,
    "query_pre_attn_scalar": 8,
    "sliding_window": 8,
    "tie_word_embeddings": True,
}


def gemma_dir(directory: Path, **config) -> Path:
    """A tiny Gemma-2 checkpoint (zero weights, the bundled tokenizer) written with numpy."""
    from safetensors.numpy import save_file

    c = {**GEMMA_CONFIG, **config}
    width, inner, head = 16, 32, 8
    tensors = {"model.embed_tokens.weight": (1024, width), "model.norm.weight": (width,)}
    for i in range(2):
        p = f"model.layers.{i}."
        tensors.update(
            {
                p + "self_attn.q_proj.weight": (2 * head, width),
                p + "self_attn.k_proj.weight": (head, width),
                p + "self_attn.v_proj.weight": (head, width),
                p + "self_attn.o_proj.weight": (width, 2 * head),
                p + "mlp.gate_proj.weight": (inner, width),
                p + "mlp.up_proj.weight": (inner, width),
                p + "mlp.down_proj.weight": (width, inner),
            }
        )
        for norm in ("input", "post_attention", "pre_feedforward", "post_feedforward"):
            tensors[f"{p}{norm}_layernorm.weight"] = (width,)
    directory.mkdir(parents=True)
    save_file(
        {k: np.zeros(s, np.float32) for k, s in tensors.items()},
        str(directory / "model.safetensors"),
    )
    write(directory / "config.json", json.dumps(c))
    for name in BUNDLED_TOKENIZER:
        os.symlink(os.path.join(DEFAULT_MODEL, name), directory / name)
    return directory


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


GARBAGE = bytes(range(256)) * 20
SHARD_INDEX = json.dumps({"weight_map": {"a": "model.safetensors", "b": "model-00002.safetensors"}})


# --------------------------------------------------------------------------- cases

MODEL_CASES = [
    Case(
        "model-missing-directory",
        "eval --model {work}/nope",
        "{work}/nope: model directory not found",
    ),
    Case(
        "model-hub-id-not-cached",
        "eval --model foo/bar",
        "--model foo/bar: not found",
        seconds=10,
    ),
    Case(
        "model-no-config",
        "parity --model {work}/model",
        "config.json: not found",
        setup=lambda w: model_dir(w, files={"config.json": None}),
    ),
    Case(
        "model-config-not-json",
        "eval --model {work}/model",
        "model/config.json:1: not valid JSON",
        setup=lambda w: model_dir(w, files={"config.json": "{model_type: gpt2"}),
    ),
    Case(
        "model-config-not-object",
        "merge --model {work}/model --adapter {adapter} --output {work}/out",
        "config.json: expected a JSON object",
        setup=lambda w: model_dir(w, files={"config.json": "[1, 2]"}),
    ),
    Case(
        "model-unknown-model-type",
        "sft --model {work}/model --steps 1 --output {work}/run",
        "model_type 'bert' is not supported",
        setup=lambda w: model_dir(w, config={"model_type": "bert"}),
    ),
    Case(
        "model-no-safetensors",
        "eval --model {work}/model",
        "no *.safetensors weights found",
        setup=lambda w: model_dir(w, files={"model.safetensors": None}),
    ),
    Case(
        "model-index-names-missing-shard",
        "eval --model {work}/model",
        "model-00002.safetensors: listed in model.safetensors.index.json but not found",
        setup=lambda w: model_dir(w, files={"model.safetensors.index.json": SHARD_INDEX}),
    ),
    Case(
        "sft-torch-truncated-weights",
        "sft --backend torch --model {work}/model --steps 1 --output {work}/run",
        "model/model.safetensors: cut short",
        setup=lambda w: model_dir(
            w, files={"model.safetensors": truncated(bundled("model.safetensors"))}
        ),
    ),
    Case(
        "sft-mlx-truncated-weights",
        "sft --backend mlx --model {work}/model --steps 1 --output {work}/run",
        "model/model.safetensors: cut short",
        setup=lambda w: model_dir(
            w, files={"model.safetensors": truncated(bundled("model.safetensors"))}
        ),
    ),
    Case(
        "dpo-torch-garbage-weights",
        "dpo --backend torch --model {work}/model --steps 1 --output {work}/run",
        "model/model.safetensors: not a safetensors file",
        setup=lambda w: model_dir(w, files={"model.safetensors": GARBAGE}),
    ),
    Case(
        "grpo-mlx-garbage-weights",
        "grpo --backend mlx --model {work}/model --steps 1 --output {work}/run",
        "model/model.safetensors: not a safetensors file",
        setup=lambda w: model_dir(w, files={"model.safetensors": GARBAGE}),
    ),
    Case(
        "eval-truncated-weights",
        "eval --backend torch --model {work}/model",
        "cut short",
        setup=lambda w: model_dir(
            w, files={"model.safetensors": truncated(bundled("model.safetensors"))}
        ),
    ),
    Case(
        "eval-mlx-empty-weights",
        "eval --backend mlx --model {work}/model",
        "model.safetensors: not a safetensors file, or cut short (0 bytes",
        setup=lambda w: model_dir(w, files={"model.safetensors": b""}),
    ),
    Case(
        "eval-weights-with-trailing-bytes",
        "eval --model {work}/model",
        "bytes after the last tensor",
        setup=lambda w: model_dir(
            w, files={"model.safetensors": bundled("model.safetensors") + b"extra"}
        ),
    ),
    Case(
        "merge-garbage-weights",
        "merge --model {work}/model --adapter {adapter} --output {work}/out",
        "not a safetensors file",
        setup=lambda w: model_dir(w, files={"model.safetensors": GARBAGE}),
    ),
    Case(
        "parity-truncated-weights",
        "parity --model {work}/model",
        "cut short",
        setup=lambda w: model_dir(
            w, files={"model.safetensors": truncated(bundled("model.safetensors"))}
        ),
    ),
    Case(
        "config-n-embd-mismatch",
        "sft --model {work}/model --steps 1 --output {work}/run",
        "transformer.wte.weight has shape (1024, 256), but config.json (vocab_size 1024, n_embd 128) makes it (1024, 128)",
        setup=lambda w: model_dir(w, config={"n_embd": 128}),
    ),
    Case(
        "config-vocab-size-mismatch",
        "eval --model {work}/model",
        "vocab_size 1000",
        setup=lambda w: model_dir(w, config={"vocab_size": 1000}),
    ),
    Case(
        "config-more-layers",
        "parity --model {work}/model",
        "no tensor transformer.h.4.ln_1.weight, which config.json (n_layer 5) describes",
        setup=lambda w: model_dir(w, config={"n_layer": 5}),
    ),
    Case(
        "config-fewer-layers",
        "merge --model {work}/model --adapter {adapter} --output {work}/out",
        "gpt2 model with n_layer 3",
        setup=lambda w: model_dir(w, config={"n_layer": 3}),
    ),
    Case(
        "config-n-inner-mismatch",
        "eval --model {work}/model",
        "mlp.c_fc.weight has shape (256, 1024)",
        setup=lambda w: model_dir(w, config={"n_inner": 512}),
    ),
    Case(
        "config-heads-do-not-divide",
        "eval --model {work}/model",
        "n_embd 256 is not a multiple of n_head 3",
        setup=lambda w: model_dir(w, config={"n_head": 3}),
    ),
    Case(
        "config-without-n-embd",
        "eval --model {work}/model",
        "n_embd must be a positive integer, got None",
        setup=lambda w: model_dir(w, config={"n_embd": None}),
    ),
    Case(
        "config-untied-without-lm-head",
        "eval --model {work}/model",
        "no tensor lm_head.weight, which config.json (tie_word_embeddings false)",
        setup=lambda w: model_dir(w, config={"tie_word_embeddings": False}),
    ),
    Case(
        "gemma2-head-dim-mismatch",
        "eval --model {work}/gemma",
        "model.layers.0.self_attn.q_proj.weight has shape (16, 16)",
        setup=lambda w: gemma_dir(w / "gemma", head_dim=4),
    ),
    Case(
        "gemma2-fewer-layers",
        "parity --model {work}/gemma",
        "gemma2 model with num_hidden_layers 1",
        setup=lambda w: gemma_dir(w / "gemma", num_hidden_layers=1),
    ),
    Case(
        "gemma2-kv-heads-do-not-divide",
        "eval --model {work}/gemma",
        "num_attention_heads 2 is not a multiple of num_key_value_heads 3",
        setup=lambda w: gemma_dir(w / "gemma", num_key_value_heads=3),
    ),
    Case(
        "eval-torch-unknown-activation",
        "eval --backend torch --model {work}/model --limit 1",
        "transformers cannot load this checkpoint (unknown 'foo'",
        setup=lambda w: model_dir(w, config={"activation_function": "foo"}),
    ),
    Case(
        "eval-mlx-unknown-activation",
        "eval --backend mlx --model {work}/model --limit 1",
        "unsupported activation 'foo'",
        setup=lambda w: model_dir(w, config={"activation_function": "foo"}),
    ),
]

TOKENIZER_CASES = [
    Case(
        "tokenizer-json-truncated",
        "eval --model {work}/model",
        "model/tokenizer.json: not a usable tokenizer (EOF while parsing",
        setup=lambda w: model_dir(w, files={"tokenizer.json": bundled("tokenizer.json")[:20000]}),
    ),
    Case(
        "tokenizer-json-wrong-structure",
        "sft --model {work}/model --steps 1 --output {work}/run",
        "model/tokenizer.json: not a usable tokenizer (Model missing",
        setup=lambda w: model_dir(w, files={"tokenizer.json": '{"version": "1.0"}'}),
    ),
    Case(
        "tokenizer-json-binary",
        "data check {math} --for sft --model {work}/model",
        "tokenizer.json: not a usable tokenizer",
        setup=lambda w: model_dir(w, files={"tokenizer.json": GARBAGE}),
    ),
    Case(
        "tokenizer-config-not-json",
        "eval --model {work}/model",
        "model/tokenizer_config.json:1: not valid JSON",
        setup=lambda w: model_dir(w, files={"tokenizer_config.json": "{bad"}),
    ),
    Case(
        "generation-config-not-json",
        "eval --model {work}/model",
        "generation_config.json:1: not valid JSON",
        setup=lambda w: model_dir(w, files={"generation_config.json": "nope"}),
    ),
    Case(
        "tokenizer-missing",
        "eval --model {work}/model",
        "model: no tokenizer (tokenizer.json",
        setup=lambda w: model_dir(w, files={"tokenizer.json": None}),
    ),
]


def lora_pair(rank_a: int, rank_b: int) -> dict[str, np.ndarray]:
    return {
        "transformer.h.0.attn.c_attn.lora_A.weight": np.zeros((rank_a, 256), np.float32),
        "transformer.h.0.attn.c_attn.lora_B.weight": np.zeros((768, rank_b), np.float32),
    }


def corrupt_adapter_weights(work: Path, content: bytes | None) -> None:
    directory = adapter_dir(work)
    path = directory / "adapter_model.safetensors"
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)


def truncated_adapter(work: Path) -> None:
    directory = adapter_dir(work)
    path = directory / "adapter_model.safetensors"
    path.write_bytes(truncated(path.read_bytes()))


ADAPTER_CASES = [
    Case(
        "eval-adapter-truncated-weights",
        "eval --adapter {work}/adapter",
        "adapter/adapter_model.safetensors: cut short",
        setup=truncated_adapter,
    ),
    Case(
        "merge-adapter-truncated-weights",
        "merge --model {model} --adapter {work}/adapter --output {work}/out",
        "adapter_model.safetensors: cut short",
        setup=truncated_adapter,
    ),
    Case(
        "parity-adapter-garbage-weights",
        "parity --model {model} --adapter {work}/adapter",
        "adapter_model.safetensors: not a safetensors file",
        setup=lambda w: corrupt_adapter_weights(w, GARBAGE),
    ),
    Case(
        "merge-adapter-without-weights",
        "merge --model {model} --adapter {work}/adapter --output {work}/out",
        "adapter/adapter_model.safetensors: not found",
        setup=lambda w: corrupt_adapter_weights(w, None),
    ),
    Case(
        "eval-adapter-missing-directory",
        "eval --adapter {work}/nope",
        "nope/adapter_config.json: not found",
    ),
    Case(
        "eval-adapter-without-r",
        "eval --adapter {work}/adapter",
        "adapter_config.json: no r (the LoRA rank)",
        setup=lambda w: adapter_dir(w, config={"r": None}),
    ),
    Case(
        "merge-adapter-r-zero",
        "merge --model {model} --adapter {work}/adapter --output {work}/out",
        "adapter_config.json: r must be a positive integer, got 0",
        setup=lambda w: adapter_dir(w, config={"r": 0}),
    ),
    Case(
        "eval-adapter-r-negative",
        "eval --adapter {work}/adapter",
        "r must be a positive integer, got -4",
        setup=lambda w: adapter_dir(w, config={"r": -4}),
    ),
    Case(
        "parity-adapter-r-fraction",
        "parity --model {model} --adapter {work}/adapter",
        "r must be a positive integer, got 4.5",
        setup=lambda w: adapter_dir(w, config={"r": 4.5}),
    ),
    Case(
        "merge-adapter-r-string",
        "merge --model {model} --adapter {work}/adapter --output {work}/out",
        "r must be a positive integer, got 'four'",
        setup=lambda w: adapter_dir(w, config={"r": "four"}),
    ),
    Case(
        "eval-adapter-config-not-json",
        "eval --adapter {work}/adapter",
        "adapter/adapter_config.json:1: not valid JSON",
        setup=lambda w: write(adapter_dir(w) / "adapter_config.json", "r: 4\n"),
    ),
    Case(
        "merge-adapter-config-not-object",
        "merge --model {model} --adapter {work}/adapter --output {work}/out",
        "adapter_config.json: expected a JSON object",
        setup=lambda w: write(adapter_dir(w) / "adapter_config.json", "[4]"),
    ),
    Case(
        "eval-adapter-without-alpha",
        "eval --adapter {work}/adapter",
        "no lora_alpha",
        setup=lambda w: adapter_dir(w, config={"lora_alpha": None}),
    ),
    Case(
        "eval-adapter-dropout-out-of-range",
        "eval --adapter {work}/adapter",
        "lora_dropout must be in [0, 1), got 1.5",
        setup=lambda w: adapter_dir(w, config={"lora_dropout": 1.5}),
    ),
    Case(
        "eval-adapter-regex-targets",
        "eval --adapter {work}/adapter",
        "target_modules as a regex is not supported",
        setup=lambda w: adapter_dir(w, config={"target_modules": ".*attn"}),
    ),
    Case(
        "eval-adapter-not-lora",
        "eval --adapter {work}/adapter",
        "peft_type 'PREFIX_TUNING' is not LORA",
        setup=lambda w: adapter_dir(w, config={"peft_type": "PREFIX_TUNING"}),
    ),
    Case(
        "eval-adapter-dora",
        "eval --adapter {work}/adapter",
        "use_dora=true is not supported",
        setup=lambda w: adapter_dir(w, config={"use_dora": True}),
    ),
    Case(
        "eval-adapter-alpha-pattern",
        "eval --adapter {work}/adapter",
        "alpha_pattern is not supported",
        setup=lambda w: adapter_dir(w, config={"alpha_pattern": {"c_attn": 4}}),
    ),
    Case(
        "eval-adapter-rank-differs-from-weights",
        "eval --adapter {work}/adapter",
        "expected rank r=8",
        setup=lambda w: adapter_dir(w, config={"r": 8}),
    ),
    Case(
        "merge-adapter-a-without-b",
        "merge --model {model} --adapter {work}/adapter --output {work}/out",
        "transformer.h.0.attn.c_attn needs both lora_A and lora_B",
        setup=lambda w: adapter_dir(
            w, weights={"transformer.h.0.attn.c_attn.lora_A.weight": np.zeros((4, 256), np.float32)}
        ),
    ),
    Case(
        "eval-adapter-unexpected-tensor",
        "eval --adapter {work}/adapter",
        "unexpected tensor 'base_model.model.transformer.wte.weight'",
        setup=lambda w: adapter_dir(
            w, weights={**lora_pair(4, 4), "transformer.wte.weight": np.zeros((2, 2), np.float32)}
        ),
    ),
    Case(
        "merge-adapter-for-another-model",
        "merge --model {gemma} --adapter {adapter} --output {work}/out",
        "module transformer.h.0.attn.c_attn has no weight in",
    ),
    Case(
        "eval-mlx-adapter-for-another-model",
        "eval --backend mlx --model {gemma} --adapter {adapter} --limit 1",
        "no module matches the LoRA targets ['c_attn']",
    ),
]

EVAL_CASES = [
    Case(
        "eval-max-new-tokens-zero",
        "eval --max-new-tokens 0",
        "--max-new-tokens must be at least 1, got 0",
    ),
    Case(
        "eval-temperature-negative",
        "eval --temperature -1",
        "--temperature must be 0 (greedy) or positive, got -1.0",
    ),
    Case(
        "eval-temperature-nan",
        "eval --task repetition --temperature nan",
        "--temperature must be 0 (greedy) or positive, got nan",
    ),
    Case(
        "eval-limit-zero",
        "eval --limit 0",
        "--limit must be at least 1 (leave it out for all examples), got 0",
    ),
    Case("eval-limit-negative", "eval --limit -3", "--limit must be at least 1"),
    Case("eval-top-p-zero", "eval --top-p 0", "--top-p must be in (0, 1], got 0.0"),
    Case(
        "eval-top-p-above-one",
        "eval --task repetition --top-p 1.5",
        "--top-p must be in (0, 1], got 1.5",
    ),
    Case("eval-top-k-negative", "eval --top-k -1", "--top-k must be 0 (off) or positive, got -1"),
    Case("eval-batch-size-zero", "eval --batch-size 0", "--batch-size must be at least 1, got 0"),
    Case(
        "eval-perplexity-batch-size-zero",
        "eval --task perplexity --batch-size 0",
        "--batch-size must be at least 1, got 0",
    ),
    Case("eval-seed-negative", "eval --seed -1", "--seed must be 0 or positive, got -1"),
    Case(
        "eval-option-of-another-task",
        "eval --task perplexity --max-new-tokens 5",
        "--max-new-tokens does not apply to --task perplexity",
    ),
    Case(
        "eval-reward-without-reward-model",
        "eval --task reward",
        "--task reward needs --reward-model",
    ),
    Case(
        "eval-chart-without-compare",
        "eval --chart {work}/c.png",
        "--chart applies with --compare only",
    ),
    Case(
        "eval-compare-with-adapter",
        "eval --compare {model} --adapter {adapter}",
        "--adapter does not apply with --compare",
    ),
    Case(
        "eval-compare-missing-entry",
        "eval --compare {model},{work}/nope",
        "{work}/nope: --compare entry not found",
    ),
    Case(
        "eval-compare-chart-folder-missing",
        "eval --compare {model},{adapter} --chart {work}/no/c.png",
        "--chart {work}/no/c.png: folder",
    ),
    Case("eval-data-missing", "eval --data {work}/nope.jsonl", "nope.jsonl: not found"),
    Case(
        "eval-data-hub-name-not-cached",
        "eval --data foo/bar",
        "foo/bar: not found: no such local file or directory, and no dataset of that name in the local Hugging Face cache",
        seconds=10,
    ),
    Case(
        "eval-data-corrupt-parquet",
        "eval --data {work}/d.parquet",
        "d.parquet: not a readable Parquet file (Parquet magic bytes not found",
        setup=lambda w: write(w / "d.parquet", GARBAGE),
    ),
    Case(
        "eval-math-data-without-answer",
        "eval --data {work}/d.jsonl",
        "missing column(s) for eval-math",
        setup=lambda w: write_jsonl(w / "d.jsonl", [{"question": "1+1?"}]),
    ),
    Case(
        "eval-math-answer-without-number",
        "eval --data {work}/d.jsonl",
        "row 1, column 'answer': no number in the answer",
        setup=lambda w: write_jsonl(
            w / "d.jsonl",
            [{"question": "a", "answer": "#### 2"}, {"question": "b", "answer": "none"}],
        ),
    ),
]


def parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))


def data_check(path: str, command: str = "sft", *extra: str) -> list[str]:
    return ["data", "check", path, "--for", command, *extra]


DATA_CASES = [
    Case(
        "data-jsonl-malformed-line",
        data_check("{work}/d.jsonl"),
        "{work}/d.jsonl:2: not valid JSON",
        setup=lambda w: write(w / "d.jsonl", '{"text": "a"}\n{"text": \n'),
    ),
    Case(
        "data-jsonl-line-not-object",
        data_check("{work}/d.jsonl"),
        "d.jsonl:1: expected a JSON object, got a list",
        setup=lambda w: write(w / "d.jsonl", '["text"]\n'),
    ),
    Case(
        "data-jsonl-missing-column",
        data_check("{work}/d.jsonl"),
        "missing column(s) for sft",
        setup=lambda w: write_jsonl(w / "d.jsonl", [{"foo": "bar"}]),
    ),
    Case(
        "data-jsonl-missing-preference-column",
        data_check("{work}/d.jsonl", "dpo"),
        "missing column(s) for dpo",
        setup=lambda w: write_jsonl(w / "d.jsonl", [{"chosen": "a"}]),
    ),
    Case(
        "data-jsonl-empty",
        data_check("{work}/d.jsonl"),
        "d.jsonl: no examples",
        setup=lambda w: write(w / "d.jsonl", "\n\n"),
    ),
    Case(
        "data-jsonl-not-utf8",
        data_check("{work}/d.jsonl"),
        "d.jsonl: not UTF-8 text (byte 0xff at offset 10)",
        setup=lambda w: write(w / "d.jsonl", b'{"text": "\xff"}\n'),
    ),
    Case(
        "data-jsonl-wrong-type",
        data_check("{work}/d.jsonl"),
        "row 0, column 'prompt'",
        setup=lambda w: write_jsonl(w / "d.jsonl", [{"prompt": ["x"], "completion": "y"}]),
    ),
    Case(
        "data-json-malformed",
        data_check("{work}/d.json"),
        "d.json:3: not valid JSON",
        setup=lambda w: write(w / "d.json", '[\n{"text": "a"},\n{"text" "b"}\n]'),
    ),
    Case(
        "data-json-not-a-list",
        data_check("{work}/d.json"),
        "expected a JSON list of objects",
        setup=lambda w: write(w / "d.json", '"text"'),
    ),
    Case(
        "data-json-item-not-object",
        data_check("{work}/d.json"),
        "item 1 is a number, not a JSON object",
        setup=lambda w: write(w / "d.json", '[{"text": "a"}, 3]'),
    ),
    Case(
        "data-parquet-corrupt",
        data_check("{work}/d.parquet"),
        "d.parquet: not a readable Parquet file",
        setup=lambda w: write(w / "d.parquet", b"PAR1" + GARBAGE + b"PAR1"),
    ),
    Case(
        "data-parquet-truncated",
        data_check("{work}/d.parquet", "grpo"),
        "not a readable Parquet file",
        setup=lambda w: write(w / "d.parquet", b"PAR1\x00\x00"),
    ),
    Case(
        "data-parquet-missing-column",
        data_check("{work}/d.parquet", "grpo"),
        "missing column(s) for grpo",
        setup=lambda w: parquet(w / "d.parquet", [{"text": "a"}]),
    ),
    Case(
        "data-csv-missing-columns",
        data_check("{work}/d.csv", "rm"),
        "missing column(s) for rm",
        setup=lambda w: write(w / "d.csv", "prompt,answer\nhi,there\n"),
    ),
    Case(
        "data-csv-malformed",
        data_check("{work}/d.csv"),
        "d.csv: not a readable CSV file (Error tokenizing data. C error: EOF inside string",
        setup=lambda w: write(w / "d.csv", 'text\n"unterminated\n'),
    ),
    Case(
        "data-csv-empty-value",
        data_check("{work}/d.csv"),
        "row 0, column 'answer': expected a string, got null",
        setup=lambda w: write(w / "d.csv", "question,answer\nwhat,\n"),
    ),
    Case(
        "data-csv-empty",
        data_check("{work}/d.csv"),
        "d.csv: no examples",
        setup=lambda w: write(w / "d.csv", ""),
    ),
    Case(
        "data-csv-not-utf8",
        data_check("{work}/d.csv"),
        "not UTF-8 text",
        setup=lambda w: write(w / "d.csv", b"text\n\xfe\xff\n"),
    ),
    Case(
        "data-unsupported-extension",
        data_check("{work}/d.xlsx"),
        "unsupported file type '.xlsx'",
        setup=lambda w: write(w / "d.xlsx", "x"),
    ),
    Case("data-missing-file", data_check("{work}/nope.jsonl"), "nope.jsonl: not found"),
    Case(
        "data-hub-name-not-cached",
        data_check("foo/bar"),
        "foo/bar: not found: no such local file or directory, and no dataset of that name",
        seconds=10,
    ),
    Case(
        "data-directory-not-saved-dataset",
        data_check("{work}/dir"),
        "not one written by datasets' save_to_disk",
        setup=lambda w: write(w / "dir" / "x.txt", "x"),
    ),
    Case(
        "eval-data-empty-name-in-list",
        "eval --data {math},",
        "empty dataset name in the comma-separated list",
    ),
    Case(
        "data-sharegpt-unknown-role",
        data_check("{work}/d.jsonl", "distill"),
        "turn 0 is from 'robot'",
        setup=lambda w: write_jsonl(
            w / "d.jsonl", [{"conversations": [{"from": "robot", "value": "x"}]}]
        ),
    ),
    Case(
        "data-conversation-ends-with-user",
        data_check("{work}/d.jsonl"),
        "the last message is from 'user', not the assistant",
        setup=lambda w: write_jsonl(
            w / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]
        ),
    ),
    Case(
        "data-kto-label-not-boolean",
        data_check("{work}/d.jsonl", "kto"),
        "column 'label': expected true or false, got a string",
        setup=lambda w: write_jsonl(
            w / "d.jsonl", [{"prompt": "p", "completion": "c", "label": "yes"}]
        ),
    ),
    Case(
        "data-preference-without-shared-prompt",
        data_check("{work}/d.jsonl", "dpo"),
        "chosen and rejected share no prompt messages",
        setup=lambda w: write_jsonl(
            w / "d.jsonl",
            [
                {
                    "chosen": [{"role": "assistant", "content": "a"}],
                    "rejected": [{"role": "assistant", "content": "b"}],
                }
            ],
        ),
    ),
    Case(
        "data-eval-math-answer-without-number",
        data_check("{work}/d.jsonl", "eval-math"),
        "column 'answer': no number in the answer",
        setup=lambda w: write_jsonl(w / "d.jsonl", [{"question": "q", "answer": "many"}]),
    ),
    Case(
        "data-max-length-without-model",
        data_check("{math}", "sft", "--max-length", "64"),
        "--max-length needs --model",
    ),
    Case(
        "data-max-length-one",
        data_check("{math}", "sft", "--max-length", "1", "--model", "{model}"),
        "--max-length must be at least 2, got 1",
    ),
    Case(
        "data-model-missing",
        data_check("{math}", "sft", "--model", "{work}/nope"),
        "nope: not found",
    ),
    Case(
        "distill-data-missing-column",
        "distill --backend mlx --data {work}/d.jsonl --steps 1 --output {work}/run",
        "missing column(s) for distill",
        setup=lambda w: write_jsonl(w / "d.jsonl", [{"foo": "bar"}]),
        absent=("run",),
    ),
    Case(
        "sft-invalid-yaml",
        "sft --config {work}/c.yaml --output {work}/run",
        "c.yaml: not valid YAML (line 3, column 1",
        setup=lambda w: write(w / "c.yaml", "steps: [1,\nbatch_size: 2\n"),
    ),
]


def pairs(*extra: str) -> list[str]:
    return ["data", "pairs", "{prompts}", "--output", "{work}/pairs.jsonl", *extra]


PAIRS_CASES = [
    Case(
        "pairs-output-exists",
        pairs(),
        "pairs.jsonl: already exists",
        setup=lambda w: write(w / "pairs.jsonl", "keep me\n"),
    ),
    Case(
        "pairs-num-generations-one",
        pairs("--num-generations", "1"),
        "--num-generations must be at least 2, got 1",
    ),
    Case("pairs-temperature-zero", pairs("--temperature", "0"), "--temperature must be positive"),
    Case(
        "pairs-max-new-tokens-zero",
        pairs("--max-new-tokens", "0"),
        "--max-new-tokens must be at least 1, got 0",
    ),
    Case("pairs-limit-zero", pairs("--limit", "0"), "--limit must be at least 1"),
    Case("pairs-min-gap-negative", pairs("--min-gap", "-1"), "--min-gap must be 0 or positive"),
    Case("pairs-seed-negative", pairs("--seed", "-2"), "--seed must be 0 or positive, got -2"),
    Case(
        "pairs-output-folder-missing",
        "data pairs {prompts} --output {work}/no/p.jsonl",
        "--output's folder does not exist",
    ),
]

MERGE_CASES = [
    Case(
        "merge-output-is-a-file",
        "merge --model {model} --adapter {adapter} --output {work}/out",
        "{work}/out: --output exists and is not a directory",
        setup=lambda w: write(w / "out", "keep me"),
    ),
    Case(
        "merge-output-not-empty",
        "merge --model {model} --adapter {adapter} --output {work}/out",
        "--output exists and is not empty; pass --force",
        setup=lambda w: write(w / "out" / "notes.txt", "keep me"),
    ),
    Case(
        "merge-output-replaces-input",
        "merge --model {model} --adapter {work}/adapter --output {work} --force",
        "--output would replace the input",
        setup=adapter_dir,
    ),
    Case(
        "merge-model-missing",
        "merge --model {work}/nope --adapter {adapter} --output {work}/out",
        "nope: model directory not found",
    ),
    Case(
        "soup-one-input", "soup {adapter} --output {work}/out", "a soup needs at least two inputs"
    ),
    Case(
        "soup-ranks-differ", "soup {adapter} {adapter8} --output {work}/out", "rank 8 differs from"
    ),
    Case(
        "soup-targets-differ",
        "soup {adapter} {adapter_proj} --output {work}/out",
        "target modules differ",
    ),
    Case(
        "soup-weights-negative",
        "soup {adapter} {adapter} --output {work}/out --weights 1,-1",
        "--weights must be non-negative with a positive sum",
    ),
    Case(
        "soup-weights-count",
        "soup {adapter} {adapter} --output {work}/out --weights 1",
        "--weights has 1 values for 2 inputs",
    ),
    Case(
        "soup-weights-not-numbers",
        "soup {adapter} {adapter} --output {work}/out --weights 1,x",
        "--weights '1,x': expected comma-separated numbers",
    ),
    Case(
        "soup-adapter-and-checkpoint",
        "soup {adapter} {model} --output {work}/out",
        "cannot mix adapters",
    ),
    Case(
        "soup-update-without-model",
        "soup {adapter} {adapter} --mode update --output {work}/out",
        "--mode update needs --model",
    ),
    Case(
        "soup-input-missing",
        "soup {adapter} {work}/nope --output {work}/out",
        "nope: directory not found",
    ),
    Case(
        "soup-output-is-a-file",
        "soup {adapter} {adapter} --output {work}/out",
        "--output exists and is not a directory",
        setup=lambda w: write(w / "out", "keep me"),
    ),
    Case(
        "soup-output-holds-an-input",
        "soup {work}/runs/adapter {adapter} --output {work}/runs --force",
        "--output would replace the input {work}/runs/adapter",
        setup=lambda w: adapter_dir(w / "runs"),
    ),
    Case(
        "soup-corrupt-adapter",
        "soup {adapter} {work}/adapter --output {work}/out",
        "adapter_model.safetensors: cut short",
        setup=truncated_adapter,
    ),
    Case(
        "soup-checkpoints-of-different-models",
        "soup {model} {gemma} --output {work}/out",
        "model_type gemma2 differs",
    ),
]

PARITY_CASES = [
    Case(
        "parity-seq-len-one",
        "parity --model {model} --seq-len 1",
        "--seq-len must be between 2 and the model's 256 positions, got 1",
    ),
    Case(
        "parity-seq-len-past-positions",
        "parity --model {model} --seq-len 1000",
        "--seq-len must be between 2 and the model's 256 positions, got 1000",
    ),
    Case(
        "parity-batch-size-zero",
        "parity --model {model} --batch-size 0",
        "--batch-size must be at least 1, got 0",
    ),
    Case(
        "parity-batch-size-above-seq-len",
        "parity --model {model} --seq-len 4 --batch-size 5",
        "--batch-size 5 exceeds the 4 tokens per row",
    ),
    Case(
        "parity-greedy-tokens-zero",
        "parity --model {model} --greedy-tokens 0",
        "--greedy-tokens must be at least 1, got 0",
    ),
    Case(
        "parity-greedy-tokens-past-positions",
        "parity --model {model} --greedy-tokens 500",
        "--greedy-tokens 500 runs past the model's 256 positions",
    ),
    Case(
        "parity-seed-negative",
        "parity --model {model} --seed -1",
        "--seed must be 0 or positive, got -1",
    ),
]


# --------------------------------------------------------------------------- training


def run_dir(work: Path, command: str = "sft", checkpoint: dict | None = None, **options):
    """{work}/run as a run of `command` leaves it: config.yaml (the options that differ from
    the defaults) and checkpoints/, with checkpoints/step-2/ holding `checkpoint`'s files."""
    import yaml

    values = {"command": command, "backend": "mlx", "steps": 4, "batch_size": 2}
    values.update(output=str(work / "run"), eval_limit=4, **options)
    if command == "sft":
        values.update(eval_math=0, eval_text=0)
    write(work / "run" / "config.yaml", yaml.safe_dump(values))
    (work / "run" / "checkpoints").mkdir()
    for name, content in (checkpoint or {}).items():
        write(work / "run" / "checkpoints" / "step-2" / name, content)


def npz(**arrays) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


STATE = json.dumps({"step": 2, "optimizer_step": 2})
RUN = "--output {work}/run"
RESUME = "--resume --output {work}/run"
# One step of GRPO on the bundled model, as small as it gets, scored by {work}/r.py's `bad`.
GRPO_ONE_STEP = (
    "grpo --backend mlx --steps 1 --batch-size 1 --num-generations 2 --max-new-tokens 4 "
    "--eval-math 0 --rewards {work}/r.py:bad " + RUN
)
PPO_ONE_STEP = GRPO_ONE_STEP.replace("grpo ", "ppo ", 1)


def reward_file(body: str):
    return lambda w: write(w / "r.py", "def bad(prompts, completions, **columns):\n" + body)


TRAINING_CASES = [
    # option values, checked by the config dataclass before anything loads
    Case(
        "sft-learning-rate-negative",
        f"sft --learning-rate -1 {RUN}",
        "--learning-rate must be > 0, got -1.0",
        absent=("run",),
    ),
    Case(
        "sft-learning-rate-not-a-number",
        f"sft --learning-rate abc {RUN}",
        "Invalid value for '--learning-rate': 'abc' is not a valid float",
    ),
    Case("sft-unknown-option", f"sft --bogus 1 {RUN}", "No such option '--bogus'"),
    Case("unknown-command", "nosuch", "No such command 'nosuch'"),
    Case("sft-lora-rank-zero", f"sft --lora-rank 0 {RUN}", "--lora-rank must be >= 1, got 0"),
    Case("sft-lora-rank-negative", f"sft --lora-rank -4 {RUN}", "--lora-rank must be >= 1, got -4"),
    Case("sft-lora-alpha-zero", f"sft --lora-alpha 0 {RUN}", "--lora-alpha must be > 0"),
    Case(
        "sft-lora-dropout-one",
        f"sft --lora-dropout 1 {RUN}",
        "--lora-dropout must be >= 0 and < 1, got 1.0",
    ),
    Case("sft-steps-zero", f"sft --steps 0 {RUN}", "--steps must be >= 1, got 0"),
    Case("sft-batch-size-zero", f"sft --batch-size 0 {RUN}", "--batch-size must be >= 1, got 0"),
    Case(
        "sft-grad-accum-not-a-divisor",
        f"sft --batch-size 16 --grad-accum 3 {RUN}",
        "--batch-size 16 is not a multiple of --grad-accum 3",
    ),
    Case("sft-fsdp-lora", f"sft --fsdp {RUN}", "--fsdp shards full fine-tuning: add --full"),
    Case(
        "sft-fsdp-mlx",
        f"sft --fsdp --full --backend mlx {RUN}",
        "--fsdp is torch's FSDP: use --backend torch, not mlx",
    ),
    Case(
        "ppo-fsdp",
        f"ppo --fsdp --full --backend torch {RUN}",
        "--fsdp is not supported for ppo (its critic is another trained model)",
    ),
    Case("sft-warmup-negative", f"sft --warmup-steps -1 {RUN}", "--warmup-steps must be >= 0"),
    Case(
        "sft-min-lr-ratio-above-one",
        f"sft --min-lr-ratio 2 {RUN}",
        "--min-lr-ratio must be >= 0 and <= 1, got 2.0",
    ),
    Case(
        "sft-max-grad-norm-negative",
        f"sft --max-grad-norm -1 {RUN}",
        "--max-grad-norm must be >= 0",
    ),
    Case(
        "sft-weight-decay-negative", f"sft --weight-decay -0.1 {RUN}", "--weight-decay must be >= 0"
    ),
    Case("sft-seed-negative", f"sft --seed -1 {RUN}", "--seed must be >= 0, got -1"),
    Case("sft-max-length-one", f"sft --max-length 1 {RUN}", "--max-length must be >= 2"),
    Case("sft-eval-every-negative", f"sft --eval-every -1 {RUN}", "--eval-every must be >= 0"),
    Case("sft-kl-beta-negative", f"sft --kl-beta -0.1 {RUN}", "--kl-beta must be >= 0"),
    Case(
        "sft-max-nonfinite-steps-zero",
        f"sft --max-nonfinite-steps 0 {RUN}",
        "--max-nonfinite-steps must be >= 1",
    ),
    Case("sft-dtype-unknown", f"sft --dtype float8 {RUN}", "Invalid value for '--dtype'"),
    Case("sft-backend-unknown", f"sft --backend jax {RUN}", "Invalid value for '--backend'"),
    Case(
        "grpo-max-new-tokens-zero",
        f"grpo --max-new-tokens 0 {RUN}",
        "--max-new-tokens must be >= 1, got 0",
    ),
    Case(
        "grpo-temperature-negative",
        f"grpo --temperature -1 {RUN}",
        "--temperature must be >= 0, got -1.0",
    ),
    Case("grpo-top-p-zero", f"grpo --top-p 0 {RUN}", "--top-p must be > 0 and <= 1, got 0.0"),
    Case("grpo-top-k-negative", f"grpo --top-k -1 {RUN}", "--top-k must be >= 0"),
    Case(
        "grpo-num-generations-one",
        f"grpo --num-generations 1 {RUN}",
        "--num-generations must be at least 2 for group advantages",
    ),
    Case("grpo-clip-low-one", f"grpo --clip-low 1 {RUN}", "--clip-low must be >= 0 and < 1"),
    Case("grpo-ppo-epochs-zero", f"grpo --ppo-epochs 0 {RUN}", "--ppo-epochs must be >= 1"),
    Case(
        "grpo-reward-failure-share-zero",
        f"grpo --reward-failure-share 0 {RUN}",
        "--reward-failure-share must be > 0 and <= 1",
    ),
    Case("ppo-gamma-above-one", f"ppo --gamma 2 {RUN}", "--gamma must be >= 0 and <= 1"),
    Case("ppo-lam-negative", f"ppo --lam -0.5 {RUN}", "--lam must be >= 0 and <= 1"),
    Case("ppo-minibatches-zero", f"ppo --minibatches 0 {RUN}", "--minibatches must be >= 1"),
    Case("ppo-batch-size-zero", f"ppo --batch-size 0 {RUN}", "--batch-size must be >= 1"),
    Case("ppo-clip-range-zero", f"ppo --clip-range 0 {RUN}", "--clip-range must be > 0"),
    Case("dpo-beta-zero", f"dpo --beta 0 {RUN}", "--beta must be > 0, got 0.0"),
    Case(
        "dpo-label-smoothing-half",
        f"dpo --label-smoothing 0.5 {RUN}",
        "--label-smoothing must be >= 0 and < 0.5",
    ),
    Case(
        "dpo-nll-alpha-with-kto",
        f"dpo --loss kto --nll-alpha 1 {RUN}",
        "--nll-alpha applies to paired losses, not kto",
    ),
    Case(
        "dpo-eval-batch-size-zero",
        f"dpo --eval-batch-size 0 {RUN}",
        "--eval-batch-size must be >= 1",
    ),
    Case("rm-centring-negative", f"rm --centring-coef -1 {RUN}", "--centring-coef must be >= 0"),
    Case(
        "distill-jsd-beta-one",
        f"distill --jsd-beta 1 {RUN}",
        "--jsd-beta must be > 0 and < 1, got 1.0",
    ),
    Case(
        "distill-temperature-zero",
        f"distill --distill-temperature 0 {RUN}",
        "--distill-temperature must be > 0",
    ),
    # --output and --config
    Case(
        "sft-output-is-a-file",
        "sft --output {work}/afile",
        "--output {work}/afile: is a file, not a directory",
        setup=lambda w: write(w / "afile", "mine\n"),
    ),
    Case(
        "sft-output-holds-a-run",
        f"sft {RUN}",
        "already holds a run; pass --resume",
        setup=lambda w: write(w / "run" / "metrics.jsonl", '{"step": 1}\n'),
    ),
    Case(
        "sft-config-missing", f"sft --config {{work}}/c.yaml {RUN}", "c.yaml: config file not found"
    ),
    Case(
        "sft-config-unknown-option",
        f"sft --config {{work}}/c.yaml {RUN}",
        "c.yaml: unknown option(s) bogus",
        setup=lambda w: write(w / "c.yaml", "bogus: 1\n"),
    ),
    Case(
        "sft-config-wrong-type",
        f"sft --config {{work}}/c.yaml {RUN}",
        "c.yaml: steps must be a int, got 'many'",
        setup=lambda w: write(w / "c.yaml", "steps: many\n"),
    ),
    Case(
        "sft-config-not-a-mapping",
        f"sft --config {{work}}/c.yaml {RUN}",
        "c.yaml: expected a mapping",
        setup=lambda w: write(w / "c.yaml", "[1, 2]\n"),
    ),
    Case(
        "sft-config-bad-choice",
        f"sft --config {{work}}/c.yaml {RUN}",
        "c.yaml: template must be one of fixed, random, got 'any'",
        setup=lambda w: write(w / "c.yaml", "template: any\n"),
    ),
    Case(
        "sft-config-value-out-of-bounds",
        f"sft --config {{work}}/c.yaml {RUN}",
        "--learning-rate must be > 0, got -0.001",
        setup=lambda w: write(w / "c.yaml", "learning_rate: -1e-3\n"),
    ),
    Case(
        "sft-data-missing",
        f"sft --backend mlx --data {{work}}/none.jsonl {RUN}",
        "none.jsonl: not found",
        absent=("run",),
    ),
    Case(
        "dpo-data-missing-column",
        f"dpo --backend mlx --data {{work}}/d.jsonl {RUN}",
        "missing column(s) for dpo",
        absent=("run",),
        setup=lambda w: write_jsonl(w / "d.jsonl", [{"prompt": "a", "chosen": "b"}]),
    ),
    # --resume: the run's own settings, and only what may change
    Case(
        "sft-resume-without-output",
        "sft --resume",
        "--resume needs --output: the run directory to continue",
    ),
    Case(
        "sft-resume-nothing-there", RESUME.join(["sft ", ""]), "no run to resume (no config.yaml)"
    ),
    Case(
        "sft-resume-changes-lora-rank",
        f"sft --lora-rank 4 {RESUME}",
        "--lora-rank 8 (given 4)",
        setup=lambda w: run_dir(w, lora_rank=8),
    ),
    Case(
        "sft-resume-full-on-a-lora-run",
        f"sft --full {RESUME}",
        "--lora True (given False)",
        setup=lambda w: run_dir(w),
    ),
    Case(
        "sft-resume-other-data",
        f"sft --data {{work}}/other.jsonl {RESUME}",
        "--data None (given '{work}/other.jsonl')",
        setup=lambda w: run_dir(w),
    ),
    Case(
        "sft-resume-other-model",
        f"sft --model {{model}} {RESUME}",
        "--model None (given '{model}')",
        setup=lambda w: run_dir(w),
    ),
    Case(
        "sft-resume-other-learning-rate",
        f"sft --learning-rate 0.1 {RESUME}",
        "--learning-rate 0.001 (given 0.1)",
        setup=lambda w: run_dir(w, learning_rate=1e-3),
    ),
    Case(
        "dpo-resume-an-sft-run",
        f"dpo {RESUME}",
        "holds a sft run, not dpo",
        setup=lambda w: run_dir(w),
    ),
    Case(
        "sft-resume-config-not-yaml",
        f"sft {RESUME}",
        "config.yaml: not valid YAML",
        setup=lambda w: write(w / "run" / "config.yaml", "steps: [4,\n"),
    ),
    Case(
        "sft-resume-config-wrong-type",
        f"sft {RESUME}",
        "config.yaml: steps must be a int",
        setup=lambda w: run_dir(w, steps="four"),
    ),
    Case(
        "sft-resume-already-trained",
        f"sft {RESUME}",
        "already trained for 4 steps; raise --steps to continue",
        setup=lambda w: (run_dir(w), write(w / "run" / "final" / "state.json", '{"step": 4}')),
    ),
    Case(
        "sft-resume-corrupt-checkpoint",
        f"sft {RESUME}",
        "checkpoints/step-2: checkpoint is unreadable (BadZipFile",
        progress=True,
        setup=lambda w: run_dir(
            w,
            checkpoint={
                "state.json": STATE,
                "trainable.npz": b"PK\x03\x04 cut",
                "optimizer.npz": npz(),
            },
        ),
    ),
    Case(
        "sft-resume-checkpoint-state-garbled",
        f"sft {RESUME}",
        "checkpoints/step-2: checkpoint is unreadable (KeyError",
        progress=True,
        setup=lambda w: run_dir(
            w,
            checkpoint={
                "state.json": '{"step": 2}',
                "trainable.npz": npz(),
                "optimizer.npz": npz(),
            },
        ),
    ),
    Case(
        "sft-resume-checkpoint-of-another-adapter",
        f"sft {RESUME}",
        "checkpoints/step-2: checkpoint does not match the run's model and adapter",
        progress=True,
        setup=lambda w: run_dir(
            w,
            checkpoint={
                "state.json": STATE,
                "trainable.npz": npz(x=np.zeros(2)),
                "optimizer.npz": npz(),
            },
        ),
    ),
    # reward functions
    Case(
        "grpo-reward-weights-not-numbers",
        f"grpo --reward-weights 1,x {RUN}",
        "--reward-weights '1,x': expected comma-separated numbers",
    ),
    Case(
        "grpo-reward-weights-count",
        f"grpo --reward-weights 1 {RUN}",
        "--reward-weights has 1 values for 2 rewards",
    ),
    Case("grpo-reward-weights-nan", f"grpo --reward-weights 1,nan {RUN}", "weights must be finite"),
    Case("grpo-rewards-none", f"grpo --rewards , {RUN}", "--rewards names no reward function"),
    Case("grpo-reward-unknown", f"grpo --rewards nope {RUN}", "unknown reward 'nope'"),
    Case(
        "grpo-reward-file-missing",
        f"grpo --backend mlx --rewards {{work}}/r.py:bad {RUN}",
        "r.py: reward file not found",
        absent=("run",),
    ),
    Case(
        "grpo-reward-module-missing",
        f"grpo --backend mlx --rewards no_such_module:f {RUN}",
        "cannot import no_such_module",
        absent=("run",),
    ),
    Case(
        "grpo-reward-function-missing",
        f"grpo --backend mlx --rewards {{work}}/r.py:good {RUN}",
        "r.py has no function good",
        setup=reward_file("    return [0.0]\n"),
        absent=("run",),
    ),
    Case(
        "grpo-reward-file-syntax-error",
        f"grpo --backend mlx --rewards {{work}}/r.py:bad {RUN}",
        "r.py, line 1: reward '{work}/r.py:bad' does not parse",
        absent=("run",),
        setup=lambda w: write(w / "r.py", "def bad(:\n"),
    ),
    Case(
        "grpo-reward-file-raises-on-import",
        f"grpo --backend mlx --rewards {{work}}/r.py:bad {RUN}",
        "importing {work}/r.py raised ZeroDivisionError: division by zero at {work}/r.py, line 1",
        absent=("run",),
        setup=lambda w: write(w / "r.py", "1 / 0\n"),
    ),
    Case(
        "grpo-reward-raises-everywhere",
        GRPO_ONE_STEP,
        "reward {work}/r.py:bad failed on 2 of 2 completions; first failing example 0",
        setup=reward_file("    raise RuntimeError('no scorer')\n"),
        progress=True,
        absent=("run",),
    ),
    Case(
        "grpo-reward-nan-everywhere",
        GRPO_ONE_STEP,
        "(RewardFailure: returned nan)",
        setup=reward_file("    return [float('nan')] * len(completions)\n"),
        progress=True,
        absent=("run",),
    ),
    Case(
        "grpo-reward-strings",
        GRPO_ONE_STEP,
        "returned <U4 values, not numbers",
        setup=reward_file("    return ['good'] * len(completions)\n"),
        progress=True,
        absent=("run",),
    ),
    Case(
        "grpo-reward-wrong-count",
        GRPO_ONE_STEP,
        "returned 2 values for 1 completions",
        setup=reward_file("    return [0.0] * (len(completions) + 1)\n"),
        progress=True,
        absent=("run",),
    ),
    Case(
        "ppo-reward-raises-everywhere",
        PPO_ONE_STEP,
        "reward {work}/r.py:bad failed on 2 of 2 completions",
        setup=reward_file("    raise KeyError('answer')\n"),
        progress=True,
        absent=("run",),
    ),
    # NaN or inf in training: exit 3, no non-finite checkpoint (the newest stays finite)
    Case(
        "sft-non-finite-training",
        "sft --backend torch --learning-rate 1e5 --warmup-steps 0 --steps 12 --save-every 2 "
        "--eval-every 0 --eval-math 0 --eval-text 0 --eval-limit 8 --batch-size 4 " + RUN,
        "loss or gradient norm NaN or inf for 3 steps in a row",
        code=3,
        progress=True,
    ),
]

CASES = (
    MODEL_CASES
    + TOKENIZER_CASES
    + ADAPTER_CASES
    + EVAL_CASES
    + DATA_CASES
    + PAIRS_CASES
    + MERGE_CASES
    + PARITY_CASES
    + TRAINING_CASES
)


# --------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, str]:
    """Fixtures every case may name, built once; no case may change them."""
    root = tmp_path_factory.mktemp("shared")
    model = root / "model"
    model.mkdir()
    for entry in os.listdir(DEFAULT_MODEL):
        os.symlink(os.path.join(DEFAULT_MODEL, entry), model / entry)
    paths = {
        "model": model,
        "gemma": gemma_dir(root / "gemma"),
        "adapter": adapter_dir(root, "adapter"),
        "adapter8": adapter_dir(root, "adapter8", rank=8),
        "adapter_proj": adapter_dir(root, "adapter-proj", target="c_proj"),
        "math": MATH,
        "prompts": PROMPTS,
        "hf_home": tmp_path_factory.mktemp("hf-home"),  # an empty Hugging Face cache
    }
    return {name: str(path) for name, path in paths.items()}


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file under root: its bytes' digest (a link: where it points)."""
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                found[path] = ("link", os.readlink(path))
            else:
                with open(path, "rb") as f:
                    found[path] = ("file", hashlib.sha256(f.read()).hexdigest())
    return found


def stat_tree(root: str) -> dict[str, tuple[int, int]]:
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            info = os.stat(os.path.join(directory, name))  # through links, into the package
            found[os.path.join(directory, name)] = (info.st_size, info.st_mtime_ns)
    return found


def params() -> list:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    return [
        pytest.param(
            case,
            id=case.id,
            marks=[pytest.mark.xfail(reason=case.xfail, strict=False)] if case.xfail else [],
        )
        for case in CASES
    ]


@pytest.mark.parametrize("case", params())
def test_bad_input(case: Case, shared, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    if case.setup is not None:
        case.setup(work)
    fill = {**shared, "work": str(work)}
    words = case.argv.split() if isinstance(case.argv, str) else case.argv
    argv = [arg.format(**fill) for arg in words]
    message = case.message.format(**fill)
    before, shared_before = snapshot(work), stat_tree(os.path.dirname(shared["model"]))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HOME": shared["hf_home"],
    }
    env.pop("HF_DATASETS_CACHE", None)
    env.pop("HF_HUB_CACHE", None)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "mlxpost.cli", *argv],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.monotonic() - start
    output = f"$ mlxpost {' '.join(argv)}\n{result.stdout}{result.stderr}"
    assert result.returncode == case.code, output
    assert "Traceback" not in result.stdout + result.stderr, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if case.progress:  # tqdm redraws with carriage returns: the last of them is what shows
        lines = [line.rsplit("\r", 1)[-1] for line in lines]
        assert [line for line in lines if line.startswith("error:")] == lines[-1:], output
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert message in lines[0], output
    for name in case.absent:
        assert not (work / name).exists(), f"{name} was left behind\n{output}"
    if case.seconds is not None:
        assert elapsed < case.seconds, f"took {elapsed:.1f}s\n{output}"
    after = snapshot(work)
    changed = [path for path, digest in before.items() if after.get(path) != digest]
    assert not changed, f"changed or removed: {changed}\n{output}"
    assert stat_tree(os.path.dirname(shared["model"])) == shared_before, output
    shutil.rmtree(work)
