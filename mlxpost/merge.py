"""Fold LoRA adapters into a checkpoint (`mlxpost merge`) and average models (`mlxpost soup`).

Backend-independent: the arithmetic is numpy in float64, the result is cast back to each
weight's own dtype, and the output keeps the base checkpoint's key names (with or without
`transformer.` / `model.`), so whatever loaded the base loads the result. Checkpoint tensors
are read and written by a backend (`tensor_io`: torch if installed, else mlx; each backend's
`checkpoint_io.py`), since numpy cannot hold bfloat16; this module imports neither framework.
Non-weight files are copied as they are, except that a config.json stating its rope only in
transformers 5's layout (`rope_parameters`) gains the same rope in the older layout
(`rope_theta`, `rope_scaling`, Gemma-3's `rope_local_base_freq`): transformers 4 and mlx-lm
read only those, and without them would silently use the default rope.

Adapter soups come in two kinds. `factors` averages lora_A and lora_B separately and writes
an adapter; since (Σ wᵢBᵢ)(Σ wⱼAⱼ) ≠ Σ wᵢBᵢAᵢ this is not the average of the updates, only a
good approximation when the adapters started from the same initialisation (mlxpost's seeded
init gives the same A for the same seed) and stayed close. `update` is exact: it folds
Σ wᵢ·ΔWᵢ, with ΔWᵢ = αᵢ/rᵢ·BᵢAᵢ, into a base checkpoint, so ranks and targets may differ.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from safetensors.numpy import save_file

from mlxpost.adapters import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, load_adapter
from mlxpost.backend import Backend, BackendUnavailable, get_backend
from mlxpost.errors import UserError
from mlxpost.model_dir import (
    SUPPORTED_ARCHITECTURES,
    body_prefix,
    read_config,
    read_json,
    read_safetensors_header,
    weight_files,
)

SOUP_MODES = ("factors", "update")
MERGED_FILE = "model.safetensors"
# Where each architecture's transformers model keeps its body; checkpoints may omit it.
BODY_PREFIXES = {arch: body_prefix(arch) for arch in SUPPORTED_ARCHITECTURES}
# GPT-2's Conv1D layers store their weight as (in, out), the transpose of nn.Linear. Decided
# by name, not shape: c_proj is square, and an adapter's fan_in_fan_out is one flag for all
# its modules.
GPT2_CONV1D = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
# Files a checkpoint directory holds weights in; every other top-level file is copied (the
# tokenizer's file set varies by model, and licence terms must travel with derivatives).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
WEIGHT_INDEX_SUFFIX = ".index.json"


# --------------------------------------------------------------------------- tensor I/O


def tensor_io() -> Backend:
    """The backend that reads and writes checkpoint tensors: torch if installed, else mlx.

    torch first: it reads each tensor on demand and converts through float64, where mlx loads
    whole files and converts through float32 (no float64 on every device). Tensors stay in the
    framework's type; only those an update or average touches go through numpy, so every
    other tensor is written back bit for bit.
    """
    for name in ("torch", "mlx"):
        try:
            return get_backend(name)
        except BackendUnavailable:
            continue
    raise UserError("merging needs torch or mlx to read checkpoints; install one of them")


class _Checkpoint:
    """A checkpoint directory's tensors (every shard), read when asked for."""

    def __init__(self, directory: str, backend: Backend):
        self.backend = backend
        self.files: dict[str, str] = {}  # key -> shard
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._shards: dict = {}  # shard -> key -> tensor getter, opened on first use
        for path in weight_files(directory):
            # The header alone gives names and shapes, whatever the dtype.
            for key, (_, shape) in read_safetensors_header(path).items():
                self.files[key] = path
                self.shapes[key] = shape

    def get(self, key: str):
        path = self.files[key]
        if path not in self._shards:
            self._shards[path] = self.backend.open_safetensors(path)
        return self._shards[path](key)


# --------------------------------------------------------------------------- output


def check_output(output_dir: str, force: bool, inputs=()) -> None:
    """--output may be replaced (a new or empty directory, or --force), and replacing it
    destroys none of the inputs."""
    if os.path.exists(output_dir):
        if not os.path.isdir(output_dir):
            raise UserError(f"{output_dir}: --output exists and is not a directory")
        if os.listdir(output_dir) and not force:
            raise UserError(
                f"{output_dir}: --output exists and is not empty; pass --force to replace it"
            )
    target = os.path.realpath(output_dir)
    for path in inputs:
        source = os.path.realpath(path)
        if source == target or source.startswith(target + os.sep):
            raise UserError(f"{output_dir}: --output would replace the input {path}")


@contextmanager
def _output_dir(output_dir: str, force: bool, announce=None) -> Iterator[str]:
    """Yield a fresh directory beside `output_dir`; it becomes `output_dir` only on success.
    `announce()` is called once every input has been checked, as writing starts."""
    check_output(output_dir, force)
    if announce is not None:
        announce()
    target = os.path.abspath(output_dir)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
    os.mkdir(tmp)
    try:
        yield tmp
        if os.path.exists(target):
            old = f"{tmp}.old"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_non_weight_files(source: str, destination: str) -> None:
    """Every top-level file but the weights; config.json gains the old rope layout's keys
    where it lacks them (old_rope_layout)."""
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        stem = name.removesuffix(WEIGHT_INDEX_SUFFIX)
        if os.path.isfile(path) and not stem.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, os.path.join(destination, name))
    config_path = os.path.join(destination, "config.json")
    config = read_json(config_path)
    old_layout = old_rope_layout(config)
    if old_layout:
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(json.dumps({**config, **old_layout}, indent=2) + "\n")


def old_rope_layout(config: dict) -> dict:
    """The config.json keys that state `rope_parameters` (transformers 5) in the layout of
    transformers 4 and mlx-lm; {} when config.json already has them, or has no rope, or a rope
    the old layout cannot state (Gemma-3 with scaled sliding layers)."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or not rope or {"rope_theta", "rope_scaling"} & set(config):
        return {}
    keys = {}
    if config.get("model_type") == "gemma3_text":
        full, sliding = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
        if (
            set(sliding) - {"rope_type", "type", "rope_theta"}
            or sliding.get("rope_type", sliding.get("type", "default")) != "default"
        ):
            return {}
        if "rope_theta" in sliding:
            keys["rope_local_base_freq"] = sliding["rope_theta"]
        rope = full
    elif "partial_rotary_factor" in rope and "partial_rotary_factor" not in config:
        keys["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if "rope_theta" in rope:
        keys["rope_theta"] = rope["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default" and not set(scaling) - {"rope_type", "type"}:
        keys["rope_scaling"] = None
    else:
        scaling = {k: v for k, v in scaling.items() if k != "type"}
        keys["rope_scaling"] = {**scaling, "rope_type": rope_type}
        if config.get("model_type") == "phi3":  # as Phi-3's own: mlx-lm's reads `type` only
            keys["rope_scaling"]["type"] = rope_type
    return keys


# --------------------------------------------------------------------------- adapters


def _load_lora(adapter_dir: str):
    """(config, {module path: (A, B)}) of an adapter whose update is alpha/r·B@A everywhere
    (load_adapter has checked every key, shape and rank)."""
    cfg, weights = load_adapter(adapter_dir)
    modules = {}
    for name in weights:
        module = name.rpartition(".lora_")[0]
        modules[module] = (weights[f"{module}.lora_A.weight"], weights[f"{module}.lora_B.weight"])
    return cfg, modules


def require_finite(value: np.ndarray, key: str, source: str) -> np.ndarray:
    """Refuse to write a tensor holding NaN or inf (nothing is written: the output is staged)."""
    if not np.all(np.isfinite(value)):
        raise UserError(f"{source}: {key} would hold NaN or inf; nothing written")
    return value


def _checkpoint_key(module: str, arch: str, shapes: dict) -> str | None:
    """The checkpoint's weight key for an adapter module path, in either key layout."""
    prefix = BODY_PREFIXES[arch]
    body_path = module.removeprefix(prefix)
    for candidate in (f"{prefix}{body_path}.weight", f"{body_path}.weight"):
        if candidate in shapes:
            return candidate
    return None


def _fold(
    model_dir: str, adapters: list[tuple[float, str]], output_dir: str, force: bool, announce
) -> str:
    """Write model_dir with Σ weight·ΔW of each (weight, adapter directory) added."""
    arch = read_config(model_dir, tokenizer=False)["model_type"]
    backend = tensor_io()
    base = _Checkpoint(model_dir, backend)
    # Checkpoint key -> [(factor, A, B, transpose)]; updates are built one tensor at a time.
    updates: dict[str, list] = {}
    for weight, adapter_dir in adapters:
        cfg, modules = _load_lora(adapter_dir)
        for module, (a, b) in modules.items():
            key = _checkpoint_key(module, arch, base.shapes)
            if key is None:
                raise UserError(
                    f"{adapter_dir}: module {module} has no weight in {model_dir} "
                    f"(looked for {module}.weight with and without {BODY_PREFIXES[arch]!r})"
                )
            transpose = arch == "gpt2" and module.rsplit(".", 1)[-1] in GPT2_CONV1D
            shape = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
            if base.shapes[key] != shape:
                raise UserError(
                    f"{adapter_dir}: update of {module} has shape {shape}, but {key} in "
                    f"{model_dir} has shape {base.shapes[key]}"
                )
            updates.setdefault(key, []).append((weight * cfg.scale, a, b, transpose))

    with _output_dir(output_dir, force, announce) as tmp:
        tensors = {}
        for key in base.files:
            tensor = base.get(key)
            if key in updates:
                value = backend.tensor_to_numpy(tensor)
                for factor, a, b, transpose in updates[key]:
                    delta = factor * (b.astype(np.float64) @ a.astype(np.float64))
                    value += delta.T if transpose else delta
                value = require_finite(value, key, model_dir)
                tensor = backend.tensor_from_numpy(value, like=tensor)
            tensors[key] = tensor
        backend.save_safetensors(tensors, os.path.join(tmp, MERGED_FILE))
        _copy_non_weight_files(model_dir, tmp)
    return output_dir


def merge_adapter(
    model_dir: str, adapter_dir: str, output_dir: str, force: bool = False, announce=None
) -> str:
    """Write `output_dir`: the checkpoint `model_dir` with the LoRA adapter folded in.

    W' = W + lora_alpha/r · B @ A (transposed for GPT-2's Conv1D), in float64, cast back to
    W's dtype. All shards become one model.safetensors; non-weight files are copied.
    """
    check_output(output_dir, force, (model_dir, adapter_dir))
    return _fold(model_dir, [(1.0, adapter_dir)], output_dir, force, announce)


# --------------------------------------------------------------------------- soups


def normalise_weights(weights: list[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise UserError(f"--weights has {len(weights)} values for {count} inputs")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"--weights must be non-negative with a positive sum, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def _input_kind(path: str) -> str:
    if not os.path.isdir(path):
        raise UserError(f"{path}: directory not found")
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return "adapter"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "checkpoint"
    raise UserError(f"{path}: neither an adapter ({CONFIG_FILE}) nor a checkpoint (config.json)")


def soup(
    inputs: list[str],
    output_dir: str,
    weights: list[float] | None = None,
    mode: str | None = None,
    model_dir: str | None = None,
    force: bool = False,
    announce=None,
) -> str:
    """Weighted average of adapters or of full checkpoints, written to `output_dir`.

    Adapters: mode `factors` (default) averages lora_A and lora_B and writes an adapter (same
    modules, rank and alpha required); mode `update` needs `model_dir` and writes it with the
    average update folded in. Checkpoints (same keys and shapes): every floating tensor is
    averaged, in the first checkpoint's dtype; its non-weight files are copied.
    """
    if len(inputs) < 2:
        raise UserError("a soup needs at least two inputs")
    check_output(output_dir, force, [*inputs, *([model_dir] if model_dir else [])])
    weights = normalise_weights(weights, len(inputs))
    kinds = {path: _input_kind(path) for path in inputs}
    if len(set(kinds.values())) > 1:
        adapter = next(p for p, k in kinds.items() if k == "adapter")
        checkpoint = next(p for p, k in kinds.items() if k == "checkpoint")
        raise UserError(f"cannot mix adapters ({adapter}) and checkpoints ({checkpoint})")
    if kinds[inputs[0]] == "checkpoint":
        if mode is not None or model_dir is not None:
            raise UserError("--mode and --model apply to adapter soups only")
        return _checkpoint_soup(inputs, weights, output_dir, force, announce)
    mode = mode or "factors"
    if mode not in SOUP_MODES:
        raise UserError(f"unknown soup mode {mode!r}; choose from {', '.join(SOUP_MODES)}")
    if mode == "update":
        if model_dir is None:
            raise UserError("--mode update needs --model, the base checkpoint to fold into")
        return _fold(model_dir, list(zip(weights, inputs)), output_dir, force, announce)
    if model_dir is not None:
        raise UserError("--model is used by --mode update only")
    return _factor_soup(inputs, weights, output_dir, force, announce)


def _factor_soup(
    inputs: list[str], weights: list[float], output_dir: str, force: bool, announce
) -> str:
    first, (cfg, modules) = inputs[0], _load_lora(inputs[0])
    loaded = [modules]
    for path in inputs[1:]:
        other_cfg, other = _load_lora(path)
        for field in ("rank", "alpha"):
            mine, theirs = getattr(cfg, field), getattr(other_cfg, field)
            if mine != theirs:
                raise UserError(
                    f"{path}: {field} {theirs} differs from {first}: {field} {mine}; "
                    "use --mode update --model BASE to average the updates instead"
                )
        if set(other) != set(modules):
            differ = sorted(set(other) ^ set(modules))
            raise UserError(f"{path}: target modules differ from {first}'s: {differ[:3]}")
        for module, (a, b) in other.items():
            if (a.shape, b.shape) != tuple(x.shape for x in modules[module]):
                raise UserError(
                    f"{path}: {module} has lora_A {a.shape}, lora_B {b.shape}; {first} has "
                    f"{modules[module][0].shape}, {modules[module][1].shape}"
                )
        loaded.append(other)
    tensors = {}
    for module in modules:
        for part, index in (("A", 0), ("B", 1)):
            total = sum(w * m[module][index].astype(np.float64) for w, m in zip(weights, loaded))
            tensors[f"{PEFT_PREFIX}{module}.lora_{part}.weight"] = total.astype(np.float32)
    with _output_dir(output_dir, force, announce) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        shutil.copy2(os.path.join(first, CONFIG_FILE), os.path.join(tmp, CONFIG_FILE))
    return output_dir


def _checkpoint_soup(
    inputs: list[str], weights: list[float], output_dir: str, force: bool, announce
) -> str:
    backend = tensor_io()
    first = inputs[0]
    arch = read_config(first, tokenizer=False)["model_type"]
    checkpoints = [_Checkpoint(first, backend)]
    for path in inputs[1:]:
        other_arch = read_config(path, tokenizer=False)["model_type"]
        if other_arch != arch:
            raise UserError(f"{path}: model_type {other_arch} differs from {first}: {arch}")
        other = _Checkpoint(path, backend)
        if other.shapes != checkpoints[0].shapes:
            keys = set(other.shapes) ^ set(checkpoints[0].shapes)
            shapes = [k for k in other.shapes if other.shapes[k] != checkpoints[0].shapes.get(k)]
            raise UserError(
                f"{path}: tensors differ from {first}'s: keys {sorted(keys)[:3]}, "
                f"shapes {sorted(shapes)[:3]}"
            )
        checkpoints.append(other)
    with _output_dir(output_dir, force, announce) as tmp:
        tensors = {}
        for key in checkpoints[0].files:
            tensor = checkpoints[0].get(key)
            if backend.is_float_tensor(tensor):
                total = sum(
                    w * backend.tensor_to_numpy(c.get(key)) for w, c in zip(weights, checkpoints)
                )
                total = require_finite(total, key, ", ".join(inputs))
                tensor = backend.tensor_from_numpy(total, like=tensor)
            tensors[key] = tensor  # integer buffers are taken from the first checkpoint
        backend.save_safetensors(tensors, os.path.join(tmp, MERGED_FILE))
        _copy_non_weight_files(first, tmp)
    return output_dir
