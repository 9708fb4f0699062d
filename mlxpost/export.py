"""Export a checkpoint, with a LoRA adapter folded in, for inference engines (`mlxpost export`).

Two formats, each written by its engine's own library:

`mlx`: a model directory that mlx-lm opens (`mlx_lm.load`). mlx-lm's own functions load the
checkpoint (`load_model`), cast it, quantize it (`quantize_model`: MLX's affine quantization,
recorded in config.json where `mlx_lm.load` reads it) and write it (`save`: safetensors, index,
config.json, tokenizer, model card). The checkpoint's tokenizer files and chat template are then
copied over the tokenizer's re-serialisation, so they are the checkpoint's own. What mlx-lm
computes differently from transformers is said in a warning; what it cannot load is refused.

`gguf`: one .gguf file that llama.cpp loads, written with the `gguf` package (llama.cpp's own
Python writer) for llama (and mistral, as llama.cpp's llama), qwen2 and qwen3. Tensors take
llama.cpp's names (`gguf.TensorNameMap`), the llama family's query and key projections
llama.cpp's rotary layout (adjacent pairs), the header the hyper-parameters llama.cpp reads
(llama3 rope scaling as its `rope_freqs` factors); the tokenizer (byte-level BPE, as
transformers loads it) is stored as metadata with its merges, special ids, BOS flag, chat
template and llama.cpp's name for its pre-tokenizer. On tiny checkpoints of each, llama.cpp
(llama-cpp-python 0.3.36) computes transformers' logits to float32 rounding and tokenizes as
transformers does (tests/test_export.py, where llama-cpp-python is installed).

An adapter is first merged (mlxpost.merge) into a temporary checkpoint; the output is written
in a staging directory beside --output and renamed into place, so an error leaves nothing
behind and an existing output is replaced only when everything has been written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable

import numpy as np

from mlxpost.errors import UserError
from mlxpost.merge import _output_dir, check_output, merge_adapter, old_rope_layout, tensor_io
from mlxpost.model_dir import (
    decoder_sizes,
    max_positions,
    read_config,
    read_json,
    read_safetensors_header,
    rope_settings,
    tied_embeddings,
    weight_files,
)

FORMATS = ("mlx", "gguf")
QUANTIZE_BITS = (4, 8)
DEFAULT_GROUP_SIZE = 64
MLX_DTYPES = ("float32", "float16", "bfloat16")
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_FILE = "model.gguf"
# model_type -> llama.cpp's architecture, for the families mapped and checked here.
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# llama.cpp's architectures that rotate adjacent pairs of a head's dimensions, where
# transformers rotates dimension j with j + head_dim/2: their q and k rows are reordered.
GGUF_PERMUTED = frozenset({"llama"})
# Files of a tokenizer (and its chat template) that are copied into an MLX export as they are.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def _stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def export_model(
    model_dir: str,
    output_dir: str,
    fmt: str,
    adapter_dir: str | None = None,
    *,
    quantize: int | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    dtype: str | None = None,
    outtype: str = "f16",
    force: bool = False,
    announce: Callable[[], None] | None = None,
    warn: Callable[[str], None] = _stderr,
) -> str:
    """Write `model_dir` (with `adapter_dir` folded in, if given) to `output_dir` in `fmt`.

    mlx: `quantize` (4 or 8 bits, group `group_size`) or `dtype` (float32, float16, bfloat16;
    default: the checkpoint's). gguf: `outtype` (f32, f16, bf16, q8_0). Each warning is one
    line passed to `warn`. Returns `output_dir`.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    inputs = [model_dir, *([adapter_dir] if adapter_dir else [])]
    check_output(output_dir, force, inputs)
    config = read_config(model_dir)
    if fmt == "mlx":
        _check_mlx_options(quantize, group_size, dtype)
        _import_mlx_lm()
        warnings = mlx_lm_limits(model_dir, config)
    else:
        if quantize is not None or dtype is not None:
            raise UserError("--quantize and --dtype apply to --format mlx; use --outtype for gguf")
        if outtype not in GGUF_OUTTYPES:
            raise UserError(f"--outtype {outtype!r}: choose one of {', '.join(GGUF_OUTTYPES)}")
        _import_gguf()
        warnings = gguf_limits(model_dir, config)
    if adapter_dir:
        from mlxpost.adapters import load_adapter

        load_adapter(adapter_dir)  # a bad adapter is reported before anything is written
    with contextlib.ExitStack() as stack:
        source = model_dir
        if adapter_dir:
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="mlxpost-export-"))
            source = merge_adapter(model_dir, adapter_dir, os.path.join(scratch, "merged"))
        with _output_dir(output_dir, force, announce) as staging:
            for message in warnings:
                warn(message)
            if fmt == "mlx":
                _write_mlx(source, staging, quantize, group_size, dtype)
            else:
                name = os.path.basename(os.path.normpath(model_dir))
                _write_gguf(source, os.path.join(staging, GGUF_FILE), outtype, name)
    return output_dir


# --------------------------------------------------------------------------- mlx


def _check_mlx_options(quantize: int | None, group_size: int, dtype: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZE_BITS:
        raise UserError(f"--quantize {quantize}: choose {' or '.join(map(str, QUANTIZE_BITS))}")
    if group_size not in (32, 64, 128):
        raise UserError(f"--group-size {group_size}: MLX quantizes in groups of 32, 64 or 128")
    if dtype is not None and dtype not in MLX_DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(MLX_DTYPES)}")


def _import_mlx_lm():
    try:
        import mlx.core  # noqa: F401
        import mlx_lm.utils
    except ImportError as err:
        raise UserError(
            f"--format mlx needs mlx and mlx-lm ({err}); install them with pip install mlx-lm"
        ) from None
    return mlx_lm.utils


def _transformers_config(config: dict):
    """config.json read by transformers' config class of its model type, which fills in the
    defaults and derived values (layer_types) the way transformers' model reads them."""
    from transformers import CONFIG_MAPPING
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    values = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    return CONFIG_MAPPING[config["model_type"]](**values)


def windowed_layers(config: dict) -> tuple[int | None, list[int]]:
    """(sliding window, the layers transformers applies it on): ([] when none does, or when the
    window is no shorter than the context, where it changes nothing)."""
    if config["model_type"] == "gpt2":
        return None, []
    cfg = _transformers_config(config)
    window = getattr(cfg, "sliding_window", None)
    if not window or window >= (max_positions(config) or math.inf):
        return window, []
    types = getattr(cfg, "layer_types", None)
    if types:
        return window, [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    if config["model_type"] in ("mistral", "phi3"):  # a window on every layer
        return window, list(range(cfg.num_hidden_layers))
    return window, []


def _mlx_lm_windowed_layers(config: dict) -> list[int]:
    """The layers mlx-lm 0.32's model of this type applies a sliding window on: its Llama
    (also Mistral's) where config.json's layer_types says so, its Gemma-3 every layer but each
    sliding_window_pattern-th; the others none."""
    arch, layers = config["model_type"], config.get("num_hidden_layers", 0)
    if arch in ("llama", "mistral") and config.get("sliding_window"):
        types = config.get("layer_types") or []
        return [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    if arch == "gemma3_text":
        pattern = config.get("sliding_window_pattern", 6)
        return [i for i in range(layers) if (i + 1) % pattern != 0]
    return []


def mlx_lm_limits(model_dir: str, config: dict) -> list[str]:
    """Warnings for what mlx-lm computes otherwise than transformers on this checkpoint;
    UserError where mlx-lm cannot load it."""
    arch = config["model_type"]
    config_path = os.path.join(model_dir, "config.json")
    if arch == "qwen3" and config.get("attention_bias"):
        raise UserError(
            f"{config_path}: mlx-lm cannot load this qwen3 checkpoint: its Qwen3 model has no "
            "attention biases, and attention_bias is true"
        )
    if "rope_parameters" in config and not {"rope_theta", "rope_scaling"} & set(config):
        if not old_rope_layout(config):
            raise UserError(
                f"{config_path}: mlx-lm reads rope_theta and rope_scaling only, which cannot "
                "state this rope_parameters (scaled sliding-window layers)"
            )
    warnings = []
    window, ours = windowed_layers(config)
    theirs = _mlx_lm_windowed_layers(config)
    if ours and ours != theirs:
        warnings.append(
            f"mlx-lm's {arch} model ignores the sliding window of {window} tokens on layers "
            f"{_ranges(sorted(set(ours) - set(theirs)) or ours)}: beyond {window} tokens its "
            "logits differ from transformers'"
        )
    if arch == "gemma3_text" and config.get("final_logit_softcapping") is not None:
        warnings.append(
            "mlx-lm's gemma3_text model does not soft-cap the final logits "
            f"(final_logit_softcapping {config['final_logit_softcapping']}): its logits differ "
            "from transformers'"
        )
    if arch == "phi3":
        rope = rope_settings(config_path, config)
        if rope["rope_type"] == "longrope" and rope["short_factor"] != rope["long_factor"]:
            warnings.append(
                "mlx-lm's phi3 model always rotates with longrope's long factors; transformers "
                "uses the short ones up to original_max_position_embeddings "
                f"({rope['original_max_position_embeddings']} tokens), so on shorter sequences "
                "the logits differ"
            )
    if arch == "gpt2" and config.get("activation_function", "gelu_new") not in (
        "gelu_new",
        "gelu_pytorch_tanh",
    ):
        warnings.append(
            f"mlx-lm's gpt2 model uses the tanh GELU, not {config['activation_function']}"
        )
    return warnings


def _ranges(indices: list[int]) -> str:
    return ", ".join(map(str, indices))


def _mlx_lm_overrides(config: dict) -> dict:
    """config.json values mlx-lm needs but a transformers 5 checkpoint may lack: the rope in
    the old layout, GPT-2's n_ctx (its context, equal to n_positions)."""
    overrides = old_rope_layout(config)
    if config["model_type"] == "gpt2" and "n_ctx" not in config:
        overrides["n_ctx"] = config["n_positions"]
    return overrides


def _model_classes(utils):
    """mlx-lm's model classes of a config, GPT-2's taking transformers' `transformer.` key
    prefix off first (its sanitize expects the keys of original GPT-2 checkpoints)."""

    def classes(config: dict):
        model_class, args_class = utils._get_classes(config)
        if config["model_type"] != "gpt2":
            return model_class, args_class

        class GPT2(model_class):
            def sanitize(self, weights):
                weights = {k.removeprefix("transformer."): v for k, v in weights.items()}
                return super().sanitize(weights)

        return GPT2, args_class

    return classes


def _write_mlx(
    source: str, staging: str, quantize: int | None, group_size: int, dtype: str | None
) -> None:
    from pathlib import Path

    utils = _import_mlx_lm()
    import mlx.core as mx
    from mlx.utils import tree_map_with_path

    config = read_json(os.path.join(source, "config.json"))
    # mlx-lm reports progress on stdout; the command's stdout is the output path alone.
    with contextlib.redirect_stdout(sys.stderr):
        model, mlx_config = utils.load_model(
            Path(source),
            lazy=True,
            model_config=_mlx_lm_overrides(config),
            get_model_classes=_model_classes(utils),
        )
        tokenizer = utils.load_tokenizer(Path(source), eos_token_ids=mlx_config.get("eos_token_id"))
        if dtype is not None:
            target = getattr(mx, dtype)
            keep = getattr(model, "cast_predicate", lambda _: True)

            def cast(path, value):
                if keep(path) and mx.issubdtype(value.dtype, mx.floating):
                    return value.astype(target)
                return value

            model.update(tree_map_with_path(cast, model.parameters()))
        if quantize is not None:
            model, mlx_config = utils.quantize_model(
                model, mlx_config, group_size, quantize, mode="affine"
            )
        target = os.path.join(staging, "model")  # mlx-lm's save wants a directory of its own
        utils.save(target, source, model, tokenizer, mlx_config)
    for name in os.listdir(target):
        os.rename(os.path.join(target, name), os.path.join(staging, name))
    os.rmdir(target)
    for name in TOKENIZER_FILES:
        path = os.path.join(source, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(staging, name))


# --------------------------------------------------------------------------- gguf


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("--format gguf needs the gguf package: pip install gguf") from None
    return gguf


def gguf_limits(model_dir: str, config: dict) -> list[str]:
    """UserError for what cannot be written as GGUF here; warnings for what llama.cpp will
    compute otherwise than transformers."""
    arch = config["model_type"]
    config_path = os.path.join(model_dir, "config.json")
    if arch not in GGUF_ARCHITECTURES:
        raise UserError(
            f"{config_path}: --format gguf supports model_type {', '.join(GGUF_ARCHITECTURES)}, "
            f"not {arch} (--format mlx takes every supported architecture)"
        )
    if arch == "qwen3" and config.get("attention_bias"):
        raise UserError(
            f"{config_path}: llama.cpp's qwen3 model has no attention biases, and "
            "attention_bias is true"
        )
    rope = rope_settings(config_path, config)
    # llama3 scaling travels as rope_freqs, checked in llama.cpp's llama only.
    ropes = (
        ("default", "linear", "llama3")
        if GGUF_ARCHITECTURES[arch] == "llama"
        else ("default", "linear")
    )
    if rope["rope_type"] not in ropes:
        raise UserError(
            f"{config_path}: rope type {rope['rope_type']!r} is not exported to GGUF for {arch} "
            f"({', '.join(ropes)} are)"
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"{config_path}: partial rotary embeddings are not exported to GGUF")
    warnings = []
    if _pre_tokenizer_name(_gguf_tokenizer(model_dir)) is None:
        warnings.append(
            f"{model_dir}: the tokenizer splits text otherwise than the pre-tokenizers llama.cpp "
            "is known here to match (GPT-2's, Llama 3's, Qwen2's): llama.cpp will use its "
            "default, so text may tokenize differently (token ids given directly are unaffected)"
        )
    window, layers = windowed_layers(config)
    if layers:
        warnings.append(
            f"llama.cpp's {GGUF_ARCHITECTURES[arch]} model ignores the sliding window of "
            f"{window} tokens: beyond {window} tokens its logits differ from transformers'"
        )
    return warnings


def _gguf_tokenizer(model_dir: str) -> dict:
    """The tokenizer as transformers loads it (its class may set its own pre-tokenizer and
    normalizer over tokenizer.json's, as Qwen2's does), in tokenizer.json's layout, when it is
    byte-level BPE (GGUF's `gpt2` tokenizer model)."""
    from mlxpost.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir).tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    model, decoder = state.get("model") or {}, state.get("decoder") or {}
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or decoder.get("type") != "ByteLevel"
    ):
        raise UserError(
            f"{model_dir}: --format gguf exports byte-level BPE tokenizers only (this one is "
            f"{model.get('type')} with a {decoder.get('type')} decoder)"
        )
    return state


# The regexes Llama 3's and Qwen2's tokenizers split text with before byte-level BPE, and
# llama.cpp's names of its pre-tokenizers that split the same way.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def _pre_tokenizer_name(tokenizer: dict) -> str | None:
    """llama.cpp's name of the tokenizer's pre-tokenizer, where it is one known here: GPT-2's
    (a ByteLevel step with its own regex), or a Split by Llama 3's or Qwen2's regex followed by
    a ByteLevel step without one. No normalizer, or NFC (Qwen2's), which changes only text
    that is not already NFC (llama.cpp does not normalize)."""
    if (tokenizer.get("normalizer") or {"type": "NFC"}).get("type") != "NFC":
        return None
    pre = tokenizer.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if (
        steps
        and len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert")
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
    ):
        return PRE_TOKENIZERS.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a query or key projection (weight or bias) from transformers' rotary layout,
    which pairs dimension j with j + d/2 within each head, to llama.cpp's, which pairs 2j with
    2j + 1: within each head, row j goes to 2j and row j + d/2 to 2j + 1."""
    rows = weight.shape[0]
    head_dim = rows // heads
    grouped = weight.reshape(heads, 2, head_dim // 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def llama_cpp_unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of llama_cpp_permute."""
    rows = weight.shape[0]
    head_dim = rows // heads
    grouped = weight.reshape(heads, head_dim // 2, 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's rope_freqs for `llama3` scaling: per frequency, the divisor that turns the
    default inverse frequency into the scaled one (transformers' llama3 rule)."""
    base = float(rope["rope_theta"])
    factor = float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_len = float(rope["original_max_position_embeddings"])
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factors = []
    for freq in inv_freq:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _checkpoint_tensors(source: str) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint as float32 numpy (float64 through the backend, so a
    bfloat16 or float16 checkpoint converts exactly)."""
    backend = tensor_io()
    tensors = {}
    for path in weight_files(source):
        get = backend.open_safetensors(path)
        for key in read_safetensors_header(path):
            tensors[key] = np.asarray(backend.tensor_to_numpy(get(key)), dtype=np.float32)
    return tensors


def _add_tensor(writer, gguf, name: str, value: np.ndarray, outtype: str) -> None:
    """One tensor in `outtype`; vectors (norms, biases) and rope factors stay float32, as
    llama.cpp's own converter keeps them; q8_0 needs rows that are a multiple of 32."""
    value = np.ascontiguousarray(value, dtype=np.float32)
    kind = outtype if value.ndim > 1 else "f32"
    if (
        kind == "q8_0"
        and value.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    ):
        kind = "f16"
    if kind == "f32":
        writer.add_tensor(name, value)
    elif kind == "f16":
        writer.add_tensor(name, value.astype(np.float16))
    else:
        qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
        data = gguf.quants.quantize(value, qtype[kind])
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype[kind])


@contextlib.contextmanager
def _quiet_gguf():
    """gguf's SpecialVocab logs what it guesses about post-processors it does not parse; the
    ids it takes are checked by the tests, and its notes are not the user's concern."""
    logger = logging.getLogger("gguf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _write_gguf(source: str, path: str, outtype: str, name: str) -> None:
    with _quiet_gguf():
        _write_gguf_file(source, path, outtype, name)


def _write_gguf_file(source: str, path: str, outtype: str, name: str) -> None:
    gguf = _import_gguf()
    config = read_config(source)
    config_path = os.path.join(source, "config.json")
    arch = config["model_type"]
    gguf_arch = GGUF_ARCHITECTURES[arch]
    sizes = decoder_sizes(config_path, config)
    rope = rope_settings(config_path, config)
    heads, kv_heads = sizes["num_attention_heads"], sizes["num_key_value_heads"]
    head_dim, layers = sizes["head_dim"], sizes["num_hidden_layers"]
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]

    writer = gguf.GGUFWriter(path, gguf_arch)
    writer.add_name(name)
    writer.add_file_type(file_type)
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(max_positions(config))
    writer.add_embedding_length(sizes["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(sizes["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(sizes["vocab_size"])
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    _add_tokenizer(writer, gguf, source, sizes["vocab_size"])

    model_arch = gguf.MODEL_ARCH[gguf_arch.upper()]
    names = gguf.TensorNameMap(model_arch, layers)
    known = _tensor_names(gguf, model_arch, layers)
    tied = tied_embeddings(config)
    if rope["rope_type"] == "llama3":
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        _add_tensor(writer, gguf, name, llama3_rope_factors(rope, head_dim), "f32")
    for key, value in _checkpoint_tensors(source).items():
        if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None or name.rsplit(".", 1)[0] not in known:
            raise UserError(f"{source}: tensor {key} has no place in llama.cpp's {gguf_arch}")
        if gguf_arch in GGUF_PERMUTED and key.endswith(("q_proj.weight", "q_proj.bias")):
            value = llama_cpp_permute(value, heads)
        elif gguf_arch in GGUF_PERMUTED and key.endswith(("k_proj.weight", "k_proj.bias")):
            value = llama_cpp_permute(value, kv_heads)
        _add_tensor(writer, gguf, name, value, outtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tensor_names(gguf, model_arch, layers: int) -> set[str]:
    """Every tensor name (less .weight or .bias) llama.cpp's architecture has."""
    names = set()
    for tensor in gguf.MODEL_TENSORS[model_arch]:
        template = gguf.TENSOR_NAMES[tensor]
        names.update(
            {template.format(bid=i) for i in range(layers)} if "{bid}" in template else {template}
        )
    return names


def _add_tokenizer(writer, gguf, source: str, vocab_size: int) -> None:
    """The tokenizer as GGUF metadata: every token by id (types: control for special added
    tokens, user-defined for other added ones, unused padding up to the model's vocabulary),
    then gguf's SpecialVocab for the merges, special ids, add-BOS flag and chat template."""
    tokenizer = _gguf_tokenizer(source)
    by_id = {int(i): token for token, i in tokenizer["model"]["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in tokenizer.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = (
            gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        )
    if by_id and max(by_id) >= vocab_size:
        raise UserError(
            f"{source}: the tokenizer has token id {max(by_id)}, past the model's vocab_size "
            f"{vocab_size}"
        )
    tokens, token_types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            token_types.append(types[i])
        else:
            tokens.append(f"[PAD{i}]")
            token_types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer) or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    special = gguf.SpecialVocab(source, load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    generation = os.path.join(source, "generation_config.json")
    if "eos" not in special.special_token_ids and os.path.isfile(generation):
        eos = read_json(generation).get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int):
            writer.add_eos_token_id(eos)


def gguf_metadata(path: str) -> dict:
    """Every metadata key of a GGUF file with its value (strings decoded, arrays as lists)."""
    gguf = _import_gguf()
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}
