"""Reading and checking a model directory (a Hugging Face checkpoint), for both backends.

(Training checkpoints, checkpoints/step-N/ of a run, are mlxpost/run.py's.)

`read_config` is the gate every command passes a model through before a backend
is imported: it reads config.json, checks that every safetensors file is whole
(from its header alone, no tensor is read), that the tensors are the ones
config.json describes, and that the tokenizer files parse. Any problem is a
UserError naming the file and, where there is one, the tensor, key or line.
"""

from __future__ import annotations

import json
import math
import os
import re
from functools import partial

from mlxpost.errors import UserError, first_line

SUPPORTED_ARCHITECTURES = ("gpt2", "gemma2")
INDEX_FILE = "model.safetensors.index.json"
# Bytes per element of safetensors dtypes; a dtype not listed is not size-checked.
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
# A header larger than this is garbage, not a header (safetensors itself allows 100 MB).
MAX_HEADER_BYTES = 100_000_000
# Files a tokenizer is built from: the fast tokenizer's, or a slow tokenizer's vocabulary.
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# JSON files next to the weights that transformers parses; a broken one fails late otherwise.
JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LAYER = re.compile(r"\.(h|layers)\.\d+\.")

# Checks already passed in this process, keyed by the files' (path, size, mtime).
_checked: set[tuple] = set()


def read_config(path: str, tokenizer: bool = True) -> dict:
    """config.json of a local checkpoint directory, once the directory is known to be usable:
    a supported model_type, whole safetensors files holding the tensors config.json describes,
    and tokenizer files that parse (with `tokenizer`, a tokenizer must be there)."""
    if not os.path.isdir(path):
        if not os.path.exists(path) and HUB_ID.match(path):
            raise UserError(
                f"{path}: model directory not found (hub ids are not downloaded; "
                "pass a local checkpoint directory)"
            )
        raise UserError(f"{path}: model directory not found")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(
            f"{config_path}: not found; --model must be a Hugging Face checkpoint directory"
        )
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: expected a JSON object")
    arch = config.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"{config_path}: model_type {arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    files = weight_files(path)
    key = tuple((f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in [config_path, *files])
    if key not in _checked:
        check_weights(config_path, config, files)
        check_tokenizer_files(path)
        _checked.add(key)
    if tokenizer and not any(os.path.isfile(os.path.join(path, f)) for f in VOCABULARY_FILES):
        raise UserError(f"{path}: no tokenizer ({' or '.join(VOCABULARY_FILES)}) found")
    return config


def read_json(path: str):
    """A JSON file's value; UserError with the line and column of a syntax error."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path}:{err.lineno}: not valid JSON ({err.msg}: column {err.colno})"
        ) from None


def max_positions(config: dict) -> int | None:
    """The longest sequence the model's positions cover (None: not stated)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if config.get(key):
            return int(config[key])
    return None


# --------------------------------------------------------------------------- weights


def weight_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint: those its index lists, else every one."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        value = read_json(index)
        weight_map = value.get("weight_map") if isinstance(value, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index}: no weight_map of tensor name -> file")
        files = [os.path.join(path, str(name)) for name in sorted(set(weight_map.values()))]
        for file in files:
            if not os.path.isfile(file):
                raise UserError(f"{file}: listed in {INDEX_FILE} but not found")
        return files
    files = sorted(
        os.path.join(path, name) for name in os.listdir(path) if name.endswith(".safetensors")
    )
    if not files:
        raise UserError(f"{path}: no *.safetensors weights found")
    return files


def read_safetensors_header(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor of a safetensors file, read from its header,
    after checking that the file holds exactly the bytes the header describes (as the
    safetensors library does before loading it)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        if not 2 <= length <= min(size - 8, MAX_HEADER_BYTES):
            raise UserError(
                f"{path}: not a safetensors file, or cut short ({size} bytes; no valid header)"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: corrupt safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors file (its header is not a JSON object)")
    tensors, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            begin, stop = (int(x) for x in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise UserError(f"{path}: corrupt safetensors header (entry {name!r})") from None
        width = DTYPE_BYTES.get(dtype)
        if stop < begin or (width is not None and stop - begin != math.prod(shape) * width):
            raise UserError(
                f"{path}: corrupt safetensors header ({name}: offsets {begin}..{stop} do not "
                f"fit shape {shape} of {dtype})"
            )
        tensors[name] = (dtype, shape)
        end = max(end, stop)
    data = size - 8 - length
    if end > data:
        raise UserError(
            f"{path}: cut short: {size} bytes, its header describes {8 + length + end} "
            "(an incomplete download or copy?)"
        )
    if end < data:
        raise UserError(
            f"{path}: corrupt safetensors file: {data - end} bytes after the last tensor"
        )
    return tensors


def check_weights(config_path: str, config: dict, files: list[str]) -> None:
    """Every tensor config.json describes is present with its shape, and no other is there."""
    found: dict[str, tuple[str, tuple[int, ...]]] = {}  # normalised name -> (file, shape)
    for file in files:
        for name, (_, shape) in read_safetensors_header(file).items():
            name = normalise_name(config["model_type"], name)
            if name is not None:
                found[name] = (file, shape)
    expected = expected_shapes(config_path, config)
    layers = "n_layer" if config["model_type"] == "gpt2" else "num_hidden_layers"
    for name, (shape, keys) in expected.items():
        described = ", ".join(f"{key} {config.get(key)}" for key in keys)
        if name not in found:
            if name == "lm_head.weight":
                if config.get("tie_word_embeddings", True):
                    continue  # the head reads the embedding
                described = "tie_word_embeddings false"
            elif LAYER.search(name):
                described = f"{layers} {config.get(layers)}"
            where = files[0] if len(files) == 1 else os.path.dirname(files[0])
            raise UserError(
                f"{where}: no tensor {name}, which {os.path.basename(config_path)} "
                f"({described}) describes"
            )
        file, actual = found[name]
        if actual != shape:
            raise UserError(
                f"{file}: {name} has shape {actual}, but {os.path.basename(config_path)} "
                f"({described}) makes it {shape}"
            )
    unexpected = [name for name in found if name not in expected]
    if unexpected:
        name = unexpected[0]
        model = f"a {config['model_type']} model"
        if LAYER.search(name):
            model += f" with {layers} {config.get(layers)} ({os.path.basename(config_path)})"
        raise UserError(f"{found[name][0]}: holds {name}, which {model} does not have")


def normalise_name(arch: str, name: str) -> str | None:
    """A checkpoint tensor name as transformers' module path; None for buffers, not weights."""
    if arch == "gpt2" and name.endswith((".attn.bias", ".attn.masked_bias")):
        return None  # causal-mask buffers of old GPT-2 checkpoints
    if name.endswith("rotary_emb.inv_freq"):
        return None  # recomputed from the config
    prefix = {"gpt2": "transformer.", "gemma2": "model."}[arch]
    if name == "lm_head.weight" or name.startswith(prefix):
        return name
    return prefix + name


def _size(config_path: str, config: dict, key: str, default=None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{config_path}: {key} must be a positive integer, got {value!r}")
    return value


def expected_shapes(config_path: str, config: dict) -> dict[str, tuple[tuple, tuple]]:
    """name -> (shape, the config keys that set it) of every weight of the architecture,
    in the order of the model (so the first difference reported is the first tensor)."""
    if config["model_type"] == "gpt2":
        return _gpt2_shapes(config_path, config)
    return _gemma2_shapes(config_path, config)


def _gpt2_shapes(config_path: str, config: dict) -> dict:
    size = partial(_size, config_path, config)
    vocab, width, layers = size("vocab_size"), size("n_embd"), size("n_layer")
    positions, heads = size("n_positions"), size("n_head")
    inner = size("n_inner") if config.get("n_inner") is not None else 4 * width
    if width % heads:
        raise UserError(f"{config_path}: n_embd {width} is not a multiple of n_head {heads}")
    inner_keys = ("n_embd", "n_inner") if config.get("n_inner") is not None else ("n_embd",)
    shapes = {
        "transformer.wte.weight": ((vocab, width), ("vocab_size", "n_embd")),
        "transformer.wpe.weight": ((positions, width), ("n_positions", "n_embd")),
    }
    for i in range(layers):
        h = f"transformer.h.{i}."
        shapes.update(
            {
                h + "ln_1.weight": ((width,), ("n_embd",)),
                h + "ln_1.bias": ((width,), ("n_embd",)),
                h + "attn.c_attn.weight": ((width, 3 * width), ("n_embd",)),
                h + "attn.c_attn.bias": ((3 * width,), ("n_embd",)),
                h + "attn.c_proj.weight": ((width, width), ("n_embd",)),
                h + "attn.c_proj.bias": ((width,), ("n_embd",)),
                h + "ln_2.weight": ((width,), ("n_embd",)),
                h + "ln_2.bias": ((width,), ("n_embd",)),
                h + "mlp.c_fc.weight": ((width, inner), inner_keys),
                h + "mlp.c_fc.bias": ((inner,), inner_keys),
                h + "mlp.c_proj.weight": ((inner, width), inner_keys),
                h + "mlp.c_proj.bias": ((width,), ("n_embd",)),
            }
        )
    shapes["transformer.ln_f.weight"] = ((width,), ("n_embd",))
    shapes["transformer.ln_f.bias"] = ((width,), ("n_embd",))
    shapes["lm_head.weight"] = ((vocab, width), ("vocab_size", "n_embd"))
    return shapes


def _gemma2_shapes(config_path: str, config: dict) -> dict:
    size = partial(_size, config_path, config)
    vocab, width, layers = size("vocab_size"), size("hidden_size"), size("num_hidden_layers")
    heads, kv_heads = size("num_attention_heads"), size("num_key_value_heads")
    head_dim, inner = size("head_dim"), size("intermediate_size")
    if heads % kv_heads:
        raise UserError(
            f"{config_path}: num_attention_heads {heads} is not a multiple of "
            f"num_key_value_heads {kv_heads}"
        )
    q_keys = ("num_attention_heads", "head_dim", "hidden_size")
    kv_keys = ("num_key_value_heads", "head_dim", "hidden_size")
    mlp_keys = ("intermediate_size", "hidden_size")
    shapes = {"model.embed_tokens.weight": ((vocab, width), ("vocab_size", "hidden_size"))}
    for i in range(layers):
        p = f"model.layers.{i}."
        attention = {
            "q_proj": (heads * head_dim, width, q_keys),
            "k_proj": (kv_heads * head_dim, width, kv_keys),
            "v_proj": (kv_heads * head_dim, width, kv_keys),
            "o_proj": (width, heads * head_dim, q_keys),
        }
        for name, (rows, cols, keys) in attention.items():
            shapes[f"{p}self_attn.{name}.weight"] = ((rows, cols), keys)
            if config.get("attention_bias"):
                shapes[f"{p}self_attn.{name}.bias"] = ((rows,), keys)
        shapes[f"{p}mlp.gate_proj.weight"] = ((inner, width), mlp_keys)
        shapes[f"{p}mlp.up_proj.weight"] = ((inner, width), mlp_keys)
        shapes[f"{p}mlp.down_proj.weight"] = ((width, inner), mlp_keys)
        for norm in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            shapes[f"{p}{norm}.weight"] = ((width,), ("hidden_size",))
    shapes["model.norm.weight"] = ((width,), ("hidden_size",))
    shapes["lm_head.weight"] = ((vocab, width), ("vocab_size", "hidden_size"))
    return shapes


# --------------------------------------------------------------------------- tokenizer


def check_tokenizer_files(path: str) -> None:
    """tokenizer.json loads and the other JSON files parse, so a corrupt tokenizer is reported
    before a model is loaded (the `tokenizers` library reads a file in milliseconds)."""
    for name in JSON_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            read_json(file)
    file = os.path.join(path, "tokenizer.json")
    if os.path.isfile(file):
        check_tokenizer_json(file)


def check_tokenizer_json(file: str) -> None:
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(file)
    except Exception as err:  # the Rust library raises a bare Exception with a serde message
        raise UserError(f"{file}: not a usable tokenizer ({first_line(err)})") from None
