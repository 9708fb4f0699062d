"""LoRA adapters in PEFT's on-disk format, shared by both backends.

Files: `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` (r, in) and `.lora_B.weight`
(out, r); the update is `lora_B(lora_A(x)) * lora_alpha / r`. Module paths are
transformers' own (`transformer.h.0.attn.c_attn`, `model.layers.0.self_attn.q_proj`),
which is also how both backends name their parameters.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

import numpy as np
from safetensors.numpy import load_file, save_file

from mlxpost.backend import DEFAULT_LORA_TARGETS, LoraConfig
from mlxpost.errors import UserError, first_line
from mlxpost.model_dir import read_json, read_safetensors_header

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# `<module path>.lora_A.weight`, optionally with PEFT's adapter name: `.lora_A.default.weight`.
LORA_KEY = re.compile(r"^(.+)\.lora_([AB])(?:\.default)?\.weight$")


class AdapterError(UserError, ValueError):
    """A missing, malformed or mismatched adapter: bad input, exit status 2."""


def resolve_targets(arch: str, cfg: LoraConfig) -> tuple[str, ...]:
    if cfg.targets:
        return tuple(cfg.targets)
    if arch not in DEFAULT_LORA_TARGETS:
        raise AdapterError(f"no default LoRA targets for model type {arch!r}; pass --lora-targets")
    return DEFAULT_LORA_TARGETS[arch]


def select_modules(paths: Iterable[str], targets: Iterable[str]) -> list[str]:
    """Module paths whose last component (or full path) is one of `targets`, like PEFT."""
    targets = set(targets)
    chosen = [p for p in paths if p.rsplit(".", 1)[-1] in targets or p in targets]
    if not chosen:
        raise AdapterError(f"no module matches the LoRA targets {sorted(targets)}")
    return chosen


def init_lora_weights(
    path: str, in_features: int, out_features: int, rank: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's default init, drawn in numpy so both backends start from identical weights.

    lora_A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a=sqrt(5)), lora_B = 0.
    The stream is keyed by (seed, module path), independent of module order.
    """
    key = [seed] + list(path.encode())
    rng = np.random.default_rng(key)
    bound = 1.0 / np.sqrt(in_features)
    lora_a = rng.uniform(-bound, bound, size=(rank, in_features)).astype(np.float32)
    lora_b = np.zeros((out_features, rank), dtype=np.float32)
    return lora_a, lora_b


def save_adapter(
    directory: str,
    weights: dict[str, np.ndarray],
    cfg: LoraConfig,
    targets: tuple[str, ...],
    arch: str,
    base_model: str,
) -> None:
    """Write PEFT files. `weights` maps `<module path>.lora_A.weight` style names to arrays."""
    os.makedirs(directory, exist_ok=True)
    tensors = {
        PEFT_PREFIX + name: np.ascontiguousarray(w, dtype=np.float32) for name, w in weights.items()
    }
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(targets),
        # GPT-2's Conv1D stores (in, out): PEFT needs to know to transpose the base weight.
        "fan_in_fan_out": arch == "gpt2",
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    _atomic_write(os.path.join(directory, WEIGHTS_FILE), lambda p: save_file(tensors, p))
    _atomic_write(os.path.join(directory, CONFIG_FILE), lambda p: _write_json(p, config))


def load_adapter(directory: str) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """Read a PEFT LoRA adapter; returns its config and weights keyed by module path names.
    Every way the files can be wrong is an AdapterError naming the file and the key or tensor."""
    config_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise AdapterError(
                f"{path}: not found (an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE})"
            )
    try:
        config = read_json(config_path)
    except UserError as err:
        raise AdapterError(str(err)) from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: expected a JSON object")
    cfg = read_lora_config(config_path, config)
    try:
        header = read_safetensors_header(weights_path)
        tensors = load_file(weights_path)
    except UserError as err:
        raise AdapterError(str(err)) from None
    except Exception as err:  # safetensors' own checks, should the header check miss one
        raise AdapterError(f"{weights_path}: unreadable ({first_line(err)})") from None
    if not header:
        raise AdapterError(f"{weights_path}: holds no tensors")
    weights = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        match = LORA_KEY.match(name)
        if match is None:
            raise AdapterError(
                f"{weights_path}: unexpected tensor {key!r} (only LoRA A/B weights are supported)"
            )
        module, part = match.group(1), match.group(2)
        if value.ndim != 2 or value.shape[0 if part == "A" else 1] != cfg.rank:
            side = "(r, in)" if part == "A" else "(out, r)"
            raise AdapterError(
                f"{weights_path}: {key} has shape {tuple(value.shape)}, expected rank "
                f"r={cfg.rank} from {CONFIG_FILE}: {side} (per-module ranks are not supported)"
            )
        if not np.all(np.isfinite(value)):
            raise AdapterError(f"{weights_path}: {key} holds NaN or inf; the adapter is unusable")
        weights[f"{module}.lora_{part}.weight"] = value.astype(np.float32)
    for name in weights:
        module = name.rpartition(".lora_")[0]
        if not {f"{module}.lora_A.weight", f"{module}.lora_B.weight"} <= set(weights):
            raise AdapterError(f"{weights_path}: {module} needs both lora_A and lora_B")
    return cfg, weights


def read_lora_config(config_path: str, config: dict) -> LoraConfig:
    """The LoraConfig of a parsed adapter_config.json, each key checked."""
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    for option in ("use_dora", "use_rslora"):
        if config.get(option):
            raise AdapterError(f"{config_path}: {option}=true is not supported")
    for option in ("rank_pattern", "alpha_pattern"):  # per-module r or alpha
        if config.get(option):
            raise AdapterError(f"{config_path}: {option} is not supported")
    for key, meaning in (("r", "the LoRA rank"), ("lora_alpha", "the update's scale numerator")):
        if key not in config:
            raise AdapterError(f"{config_path}: no {key} ({meaning})")
    rank = config.get("r")
    if isinstance(rank, float) and rank.is_integer():
        rank = int(rank)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"{config_path}: r must be a positive integer, got {rank!r}")
    alpha = config.get("lora_alpha")
    if not _is_number(alpha):
        raise AdapterError(f"{config_path}: lora_alpha must be a number, got {alpha!r}")
    dropout = config.get("lora_dropout", 0.0)
    if dropout is None:
        dropout = 0.0
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise AdapterError(f"{config_path}: lora_dropout must be in [0, 1), got {dropout!r}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        raise AdapterError(
            f"{config_path}: target_modules as a regex is not supported; list the names"
        )
    if targets is not None and (
        not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)
    ):
        raise AdapterError(
            f"{config_path}: target_modules must be a list of module names, got {targets!r}"
        )
    return LoraConfig(
        rank=rank,
        alpha=float(alpha),
        dropout=float(dropout),
        targets=tuple(targets) if targets else None,
    )


def _is_number(value) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and np.isfinite(float(value))
    )


def check_adapter_fits(source: str, expected: dict, weights: dict) -> None:
    """Raise naming the tensors that differ between an adapter file and the attached layers."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise AdapterError(
            f"{source}: adapter does not fit this model; missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, value in weights.items():
        if tuple(expected[name].shape) != tuple(value.shape):
            raise AdapterError(
                f"{source}: {name} has shape {tuple(value.shape)}, the model needs {tuple(expected[name].shape)}"
            )


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")


def _atomic_write(path: str, write) -> None:
    """Write to a temporary name then rename, so a crash never leaves a half file."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)
