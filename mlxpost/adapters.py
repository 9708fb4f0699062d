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
from collections.abc import Iterable

import numpy as np
from safetensors.numpy import load_file, save_file

from mlxpost.backend import DEFAULT_LORA_TARGETS, LoraConfig
from mlxpost.errors import UserError

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


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
    """Read a PEFT LoRA adapter; returns its config and weights keyed by module path names."""
    config_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise AdapterError(
                f"{path}: not found (an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE})"
            )
    try:
        with open(config_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise AdapterError(f"{config_path}: not valid JSON ({err})") from err
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    for option in ("use_dora", "use_rslora"):
        if config.get(option):
            raise AdapterError(f"{config_path}: {option}=true is not supported")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        raise AdapterError(
            f"{config_path}: target_modules as a regex is not supported; list the names"
        )
    cfg = LoraConfig(
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout", 0.0)),
        targets=tuple(targets) if targets else None,
    )
    weights = {}
    for key, value in load_file(weights_path).items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        # PEFT may keep the adapter name in keys saved by hand: `lora_A.default.weight`.
        name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        if ".lora_A." not in name and ".lora_B." not in name:
            raise AdapterError(
                f"{weights_path}: unexpected tensor {key!r} (only LoRA A/B weights are supported)"
            )
        weights[name] = value.astype(np.float32)
    return cfg, weights


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
