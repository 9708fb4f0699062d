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
from dataclasses import dataclass
from functools import partial

from mlxpost.errors import UserError, first_line

SUPPORTED_ARCHITECTURES = (
    "gpt2",
    "gemma2",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma3_text",
    "phi3",
)
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
    check_options(config_path, config)
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


# --------------------------------------------------------------------------- options

# Rope types mlxpost implements, on both backends; the others (yarn, dynamic, ...) would run
# on the torch backend and give other numbers on mlx, so no command accepts them.
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
# Numbers each rope type needs beside rope_theta (transformers' required keys).
ROPE_NUMBERS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": ("original_max_position_embeddings",),
}
# Gemma-3's rope per layer type, with its config class's bases for each.
GEMMA3_LAYER_TYPES = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


def check_options(config_path: str, config: dict) -> None:
    """Options of config.json that mlxpost does not implement are refused here, by name,
    rather than computing other numbers than the model was trained with."""
    arch = config["model_type"]
    if arch in ("gemma2", "gemma3_text") and config.get("use_bidirectional_attention"):
        raise UserError(
            f"{config_path}: use_bidirectional_attention is not supported (mlxpost trains "
            "causal language models; this is an encoder configuration)"
        )
    if arch == "gemma3_text" and config.get("attn_logit_softcapping") is not None:
        # transformers' Gemma-3 stores it but never applies it: no backend could match both.
        raise UserError(
            f"{config_path}: attn_logit_softcapping is not supported for gemma3_text "
            "(transformers' Gemma-3 ignores it; Gemma-3 checkpoints set it to null)"
        )
    if arch in FAMILIES:
        rope_settings(config_path, config)


def rope_settings(config_path: str, config: dict) -> dict:
    """The rotary embedding of a decoder family, in transformers' new layout whichever
    layout config.json uses: {"rope_type", "rope_theta", and the type's numbers}; for
    gemma3_text one such dict per layer type ({"full_attention": ..., "sliding_attention":
    ...}). The old layout is `rope_scaling` + `rope_theta` (+ Gemma-3's
    `rope_local_base_freq` for its sliding layers), the new one `rope_parameters`; where
    both are there, `rope_scaling` wins, as in transformers. UserError for a rope type
    mlxpost does not implement or a number it lacks."""
    arch = config["model_type"]
    scaling = _rope_dict(config_path, config, "rope_scaling")
    parameters = _rope_dict(config_path, config, "rope_parameters")
    if arch == "gemma3_text":
        if parameters and not set(parameters) & set(GEMMA3_LAYER_TYPES):
            raise UserError(
                f"{config_path}: rope_parameters of gemma3_text must be keyed by layer type "
                f"({', '.join(GEMMA3_LAYER_TYPES)}), got keys {', '.join(sorted(parameters))}"
            )
        settings = {}
        for layer_type, theta in GEMMA3_LAYER_TYPES.items():
            where = f"rope_parameters.{layer_type}"
            rope = _rope_dict(config_path, parameters, layer_type, where)
            theta_key = "rope_theta" if layer_type == "full_attention" else "rope_local_base_freq"
            if layer_type == "full_attention" and scaling:
                rope, where = {**rope, **scaling}, "rope_scaling"  # scales the global layers
            settings[layer_type] = _check_rope(
                config_path, config, rope, where, theta_key, config.get(theta_key, theta)
            )
        return settings
    rope, where = (scaling, "rope_scaling") if scaling else (parameters, "rope_parameters")
    if config.get("partial_rotary_factor") is not None:
        rope.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    return _check_rope(
        config_path, config, rope, where, "rope_theta", config.get("rope_theta", 10_000.0)
    )


def _rope_dict(config_path: str, config: dict, key: str, where: str | None = None) -> dict:
    value = config.get(key)
    if value is not None and not isinstance(value, dict):
        raise UserError(
            f"{config_path}: {where or key} must be a JSON object, got {json.dumps(value)}"
        )
    return dict(value) if value else {}


def _check_rope(
    config_path: str, config: dict, rope: dict, where: str, theta_key: str, theta
) -> dict:
    """`rope` (a copy) with its type resolved and its defaults filled in, each number
    checked; `theta` (config.json's `theta_key`, or the default) when it states none."""
    arch = config["model_type"]
    supported = FAMILIES[arch].rope_types
    rope_type = rope.pop("type", None)  # the old name of rope_type
    rope_type = rope.get("rope_type", rope_type) or "default"
    if rope_type not in supported:
        raise UserError(
            f"{config_path}: rope type {rope_type!r} ({where}) is not supported for {arch}; "
            f"supported: {', '.join(supported)}"
        )
    rope["rope_type"] = rope_type
    source = {}  # key -> where config.json states it, when not in `where`
    if "rope_theta" not in rope:
        rope["rope_theta"], source["rope_theta"] = theta, theta_key
    if rope_type in ("llama3", "longrope"):
        # Phi-3 states its pre-training length beside the rope parameters, and that wins.
        key = "original_max_position_embeddings"
        if arch == "phi3" and config.get(key) is not None:
            rope[key], source[key] = config[key], key
        elif key not in rope:
            rope[key], source[key] = (
                config.get("max_position_embeddings"),
                "max_position_embeddings",
            )
    for key in ("rope_theta", *ROPE_NUMBERS.get(rope_type, ())):
        if not _positive_number(rope.get(key)):
            raise UserError(
                f"{config_path}: {source.get(key, f'{where}.{key}')} must be a positive number "
                f"for rope type {rope_type!r}, got {json.dumps(rope.get(key))}"
            )
    fraction = rope.get("partial_rotary_factor", 1.0)
    if not _positive_number(fraction) or fraction > 1:
        raise UserError(
            f"{config_path}: partial_rotary_factor must be a number in (0, 1], "
            f"got {json.dumps(fraction)}"
        )
    if rope_type == "longrope":
        pairs = int(decoder_sizes(config_path, config)["head_dim"] * fraction) // 2
        for key in ("short_factor", "long_factor"):
            value = rope.get(key)
            if not (
                isinstance(value, list)
                and len(value) == pairs
                and all(_positive_number(x) for x in value)
            ):
                got = f"{len(value)} values" if isinstance(value, list) else json.dumps(value)
                raise UserError(
                    f"{config_path}: {where}.{key} must be a list of {pairs} positive numbers "
                    f"(one per rotary frequency pair), got {got}"
                )
    return rope


def _positive_number(value) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


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
    arch = config["model_type"]
    found: dict[str, tuple[str, tuple[int, ...]]] = {}  # normalised name -> (file, shape)
    for file in files:
        for name, (_, shape) in read_safetensors_header(file).items():
            name = normalise_name(arch, name)
            if name is not None:
                found[name] = (file, shape)
    expected = expected_shapes(config_path, config)
    if "quantization" in config:
        expected = quantized_shapes(config_path, config, expected, found)
    sizes = {} if arch == "gpt2" else decoder_sizes(config_path, config)
    layers = "n_layer" if arch == "gpt2" else "num_hidden_layers"
    for name, (shape, keys) in expected.items():
        described = ", ".join(_describe(config, sizes, key) for key in keys)
        if name not in found:
            if name == "lm_head.weight":
                if tied_embeddings(config):
                    continue  # the head reads the embedding
                described = "tie_word_embeddings false"
                if "tie_word_embeddings" not in config:
                    described += f", the {arch} default"
            elif (match := LAYER.search(name)) and not any(
                other.startswith(name[: match.end()]) for other in found
            ):
                described = f"{layers} {config.get(layers)}"  # the whole layer is missing
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
        model = f"a {arch} model"
        if LAYER.search(name):
            model += f" with {layers} {config.get(layers)} ({os.path.basename(config_path)})"
        raise UserError(f"{found[name][0]}: holds {name}, which {model} does not have")


def quantized_shapes(config_path: str, config: dict, expected: dict, found: dict) -> dict:
    """`expected` for a checkpoint mlx-lm quantized (config.json's "quantization": group_size,
    bits, and per-module overrides): a 2-D weight stored with `.scales` next to it holds
    bits/32 packed columns, with scales and biases of one column per group."""
    quant = config["quantization"]
    name = os.path.basename(config_path)
    if not isinstance(quant, dict) or not all(
        isinstance(quant.get(k), int) and quant[k] > 0 for k in ("group_size", "bits")
    ):
        raise UserError(f'{config_path}: "quantization" must give integer group_size and bits')
    if config["model_type"] == "gpt2":
        raise UserError(
            f"{config_path}: quantized GPT-2 checkpoints (mlx-lm's layout) are not supported; "
            "load the unquantized checkpoint with --quantize"
        )
    out = {}
    for key, (shape, keys) in expected.items():
        module = key.removesuffix(".weight")
        if len(shape) != 2 or module == key or f"{module}.scales" not in found:
            out[key] = (shape, keys)
            continue
        own = quant.get(module) if isinstance(quant.get(module), dict) else quant
        bits, group = own.get("bits", quant["bits"]), own.get("group_size", quant["group_size"])
        rows, cols = shape
        if cols % group or (cols * bits) % 32:
            raise UserError(
                f"{found[key][0] if key in found else config_path}: {key} is quantized, but its "
                f"{cols} columns ({name}) do not split into groups of {group} at {bits} bits"
            )
        described = (*keys, "quantization")
        out[key] = ((rows, cols * bits // 32), described)
        out[f"{module}.scales"] = ((rows, cols // group), described)
        if own.get("mode", quant.get("mode", "affine")) == "affine":
            out[f"{module}.biases"] = ((rows, cols // group), described)
    return out


def _describe(config: dict, sizes: dict, key: str) -> str:
    """`key value` for an error message, the value as JSON writes it; a size config.json
    leaves out is marked default."""
    if config.get(key) is None and key in sizes:
        return f"{key} {sizes[key]} (default)"
    value = config.get(key)
    return f"{key} {json.dumps(value) if isinstance(value, bool) or value is None else value}"


def normalise_name(arch: str, name: str) -> str | None:
    """A checkpoint tensor name as transformers' module path; None for buffers, not weights."""
    if arch == "gpt2" and name.endswith((".attn.bias", ".attn.masked_bias")):
        return None  # causal-mask buffers of old GPT-2 checkpoints
    if name.endswith("rotary_emb.inv_freq"):
        return None  # recomputed from the config
    prefix = body_prefix(arch)
    if name.startswith(("lm_head.", prefix)):
        return name
    return prefix + name  # a base-model checkpoint (GPT2Model, LlamaModel, ...)


def body_prefix(arch: str) -> str:
    """Where transformers' causal-LM model keeps its body: `transformer.` (GPT-2) or `model.`."""
    return "transformer." if arch == "gpt2" else "model."


def tied_embeddings(config: dict) -> bool:
    """Whether the head reads the embedding: config.json's tie_word_embeddings, else the
    default of the architecture's transformers config (true for GPT-2 and Gemma, false for
    the Llama, Mistral, Qwen and Phi-3 families)."""
    value = config.get("tie_word_embeddings")
    if value is None:
        family = FAMILIES.get(config["model_type"])
        return family.tied if family is not None else True
    return bool(value)


def _size(config_path: str, config: dict, key: str, default=None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{config_path}: {key} must be a positive integer, got {value!r}")
    return value


def expected_shapes(config_path: str, config: dict) -> dict[str, tuple[tuple, tuple]]:
    """name -> (shape, the config keys that set it) of every weight of the architecture,
    in the order of the model (so the first difference reported is the first tensor).
    lm_head.weight is listed whether or not the embedding is tied (a tied checkpoint may
    leave it out)."""
    if config["model_type"] == "gpt2":
        return _gpt2_shapes(config_path, config)
    return _decoder_shapes(config_path, config)


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


@dataclass(frozen=True)
class Family:
    """How a decoder family of transformers lays out its weights, as its modeling file
    builds them (every family here: embed_tokens, layers of self_attn + mlp + RMSNorms, norm,
    lm_head). The defaults are those of its config class, for keys config.json leaves out."""

    tied: bool  # tie_word_embeddings
    kv_heads: int | None  # num_key_value_heads; None: num_attention_heads
    head_dim: int | None  # head_dim; None: hidden_size / num_attention_heads
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    attention_bias: bool = False  # config.json's attention_bias puts biases on q, k, v, o
    qkv_bias: bool = False  # q, k and v always have biases (o never)
    mlp_bias: bool = False  # config.json's mlp_bias puts biases on gate, up, down
    qk_norm: bool = False  # RMSNorms of head_dim on queries and keys (q_norm, k_norm)
    fused: bool = False  # one qkv_proj and one gate_up_proj (Phi-3)
    rope_types: tuple[str, ...] = ROPE_TYPES


GEMMA_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
FAMILIES = {
    "gemma2": Family(tied=True, kv_heads=4, head_dim=256, norms=GEMMA_NORMS, attention_bias=True),
    "llama": Family(tied=False, kv_heads=None, head_dim=None, attention_bias=True, mlp_bias=True),
    "mistral": Family(tied=False, kv_heads=8, head_dim=None),
    "qwen2": Family(tied=False, kv_heads=32, head_dim=None, qkv_bias=True),
    "qwen3": Family(tied=False, kv_heads=32, head_dim=128, attention_bias=True, qk_norm=True),
    "gemma3_text": Family(
        tied=True, kv_heads=4, head_dim=256, norms=GEMMA_NORMS, attention_bias=True, qk_norm=True
    ),
    # transformers' Phi-3 accepts default and longrope only.
    "phi3": Family(
        tied=False, kv_heads=None, head_dim=None, fused=True, rope_types=("default", "longrope")
    ),
}


def decoder_sizes(config_path: str, config: dict) -> dict[str, int]:
    """The sizes of a decoder family's weights, each from config.json or, where it leaves
    one out (or null), as transformers fills it in."""
    family = FAMILIES[config["model_type"]]
    size = partial(_size, config_path, config)
    sizes = {
        key: size(key)
        for key in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        )
    }
    heads, width = sizes["num_attention_heads"], sizes["hidden_size"]
    if config.get("num_key_value_heads") is not None:
        sizes["num_key_value_heads"] = size("num_key_value_heads")
    elif "num_key_value_heads" in config or family.kv_heads is None:
        sizes["num_key_value_heads"] = heads
    else:
        sizes["num_key_value_heads"] = family.kv_heads
    if config.get("head_dim") is not None:
        sizes["head_dim"] = size("head_dim")
    elif family.head_dim is not None and "head_dim" not in config:
        sizes["head_dim"] = family.head_dim
    elif width % heads:
        raise UserError(
            f"{config_path}: hidden_size {width} is not a multiple of num_attention_heads "
            f"{heads}, and no head_dim is given"
        )
    else:
        sizes["head_dim"] = width // heads
    if heads % sizes["num_key_value_heads"]:
        raise UserError(
            f"{config_path}: num_attention_heads {heads} is not a multiple of "
            f"num_key_value_heads {sizes['num_key_value_heads']}"
        )
    return sizes


def _decoder_shapes(config_path: str, config: dict) -> dict:
    family = FAMILIES[config["model_type"]]
    sizes = decoder_sizes(config_path, config)
    vocab, width, inner = sizes["vocab_size"], sizes["hidden_size"], sizes["intermediate_size"]
    q_rows = sizes["num_attention_heads"] * sizes["head_dim"]
    kv_rows = sizes["num_key_value_heads"] * sizes["head_dim"]
    q_keys = ("num_attention_heads", "head_dim", "hidden_size")
    kv_keys = ("num_key_value_heads", "head_dim", "hidden_size")
    mlp_keys = ("intermediate_size", "hidden_size")
    attention_bias = family.attention_bias and bool(config.get("attention_bias"))
    mlp_bias = family.mlp_bias and bool(config.get("mlp_bias"))
    # (module, rows, columns, keys, the config key that gives it a bias or None), in the order
    # of the modeling file. Qwen-2's q/k/v biases come with the model type.
    if family.fused:
        qkv_keys = ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size")
        attention = [
            ("qkv_proj", q_rows + 2 * kv_rows, width, qkv_keys, None),
            ("o_proj", width, q_rows, q_keys, None),
        ]
        mlp = [
            ("gate_up_proj", 2 * inner, width, mlp_keys, None),
            ("down_proj", width, inner, mlp_keys, None),
        ]
    else:
        o_bias = "attention_bias" if attention_bias else None
        qkv_bias = o_bias or ("model_type" if family.qkv_bias else None)
        mlp_bias = "mlp_bias" if mlp_bias else None
        attention = [
            ("q_proj", q_rows, width, q_keys, qkv_bias),
            ("k_proj", kv_rows, width, kv_keys, qkv_bias),
            ("v_proj", kv_rows, width, kv_keys, qkv_bias),
            ("o_proj", width, q_rows, q_keys, o_bias),
        ]
        mlp = [
            ("gate_proj", inner, width, mlp_keys, mlp_bias),
            ("up_proj", inner, width, mlp_keys, mlp_bias),
            ("down_proj", width, inner, mlp_keys, mlp_bias),
        ]

    shapes = {"model.embed_tokens.weight": ((vocab, width), ("vocab_size", "hidden_size"))}
    for i in range(sizes["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for part, modules in (("self_attn", attention), ("mlp", mlp)):
            for name, rows, cols, keys, bias in modules:
                shapes[f"{p}{part}.{name}.weight"] = ((rows, cols), keys)
                if bias:
                    shapes[f"{p}{part}.{name}.bias"] = ((rows,), (bias, *keys))
        if family.qk_norm:
            for name in ("q_norm", "k_norm"):
                shapes[f"{p}self_attn.{name}.weight"] = ((sizes["head_dim"],), ("head_dim",))
        for norm in family.norms:
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
