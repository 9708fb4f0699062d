"""Pieces shared by the MLX model files: attention mask/bias, attention core, KV cache, loading.

Conventions used throughout (they mirror transformers so the two backends compute the same
numbers):

* Positions in the attention rule are *buffer indices*: the i-th new token of a forward call
  sits at ``q = cache.offset + i`` and key ``k`` is the k-th slot of the KV buffer.  A query may
  see a key iff ``k <= q`` and ``key_mask[b, k]`` and, on sliding layers, ``q - k < window``.
  That is transformers' ``kv_idx <= q_idx`` / ``kv_idx > q_idx - sliding_window`` rule.
* The key mask may hold segment ids instead of 0/1 (packed rows: 0 padding, k the row's k-th
  example): a real query then sees only keys of its own segment.  With a 0/1 mask this is the
  rule above, unchanged.
* Masked scores get the float32 minimum as an additive bias (what transformers' eager mask
  uses).  A row with no visible key therefore becomes a uniform softmax instead of NaN.
"""

from __future__ import annotations

import glob
import json
import os

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

NEG_BIAS = float(mx.finfo(mx.float32).min)


# --------------------------------------------------------------------------- attention


def attention_bias(
    key_mask: mx.array | None,
    offset: int,
    q_len: int,
    batch: int,
    sliding_window: int | None = None,
) -> mx.array:
    """Additive float32 bias (B, 1, T, S) with S = offset + T: 0 where allowed, NEG_BIAS elsewhere.

    key_mask (B, S): 0 on padding; 1, or the segment id of a packed row, on real tokens. A
    query sees a key iff causal, the key is real, the window allows it, and the query is in
    the key's segment (a padding query, segment 0, sees every real key before it, as with a
    0/1 mask, so it never has an empty row unless nothing real precedes it)."""
    kv_len = offset + q_len
    q_idx = mx.arange(offset, kv_len)[:, None]  # (T, 1) buffer index of each query
    k_idx = mx.arange(kv_len)[None, :]  # (1, S)
    allowed = k_idx <= q_idx  # (T, S) causal
    if sliding_window is not None:
        allowed = allowed & (q_idx - k_idx < sliding_window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if key_mask is not None:
        if key_mask.shape != (batch, kv_len):
            raise ValueError(
                f"key_mask must have shape (batch, cache offset + T) = {(batch, kv_len)}, "
                f"got {tuple(key_mask.shape)}"
            )
        segments = key_mask.astype(mx.int32)
        key_seg = segments[:, None, None, :]  # (B, 1, 1, S)
        query_seg = segments[:, offset:, None][:, None]  # (B, 1, T, 1)
        same = (query_seg == key_seg) | (query_seg == 0)
        allowed = allowed & (key_seg > 0) & same  # (B, 1, T, S)
    else:
        allowed = mx.broadcast_to(allowed, (batch, 1, q_len, kv_len))
    zero = mx.array(0.0, dtype=mx.float32)
    return mx.where(allowed, zero, mx.array(NEG_BIAS, dtype=mx.float32))


def attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    bias: mx.array,
    scale: float,
    softcap: float | None = None,
    float32: bool = False,
) -> mx.array:
    """Eager attention in the order transformers uses; returns (B, H, T, D).

    With `float32`, scores, softmax and the weighted sum are computed in float32 and rounded
    once at the end, as torch's fused scaled_dot_product_attention kernels do; without it the
    scores and probabilities are rounded to the activation dtype as transformers' eager
    attention rounds them. The two agree in float32 and differ by rounding in half precision,
    so each architecture uses the one its torch backend runs (README: architectures).

    q: (B, H, T, D); k, v: (B, KVH, S, D) with H a multiple of KVH (grouped-query attention:
    query head h reads kv head h // (H // KVH), like transformers' repeat_kv).  Scores are
    computed in the activation dtype, soft-capped there, then the bias is added and the softmax
    taken in float32 (Gemma-2's ``softmax(..., dtype=float32)``), and probabilities cast back.
    """
    B, H, T, D = q.shape
    kvh = k.shape[1]
    out_dtype = v.dtype
    if float32:
        q, k, v = q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32)
    rep = H // kvh
    # Group query heads under their kv head instead of materialising repeated k/v.
    qg = q.reshape(B, kvh, rep, T, D)  # (B, KVH, rep, T, D)
    kg = k[:, :, None]  # (B, KVH, 1, S, D)
    vg = v[:, :, None]  # (B, KVH, 1, S, D)
    scores = (qg @ kg.swapaxes(-1, -2)) * scale  # (B, KVH, rep, T, S)
    if softcap is not None:
        scores = mx.tanh(scores / softcap) * softcap
    scores = scores.astype(mx.float32) + bias[:, :, None]  # bias (B, 1, 1, T, S)
    probs = mx.softmax(scores, axis=-1).astype(v.dtype)
    out = probs @ vg  # (B, KVH, rep, T, D)
    return out.reshape(B, H, T, D).astype(out_dtype)


def gelu_tanh(x: mx.array) -> mx.array:
    """tanh-approximated GELU (transformers' gelu_new and gelu_pytorch_tanh)."""
    return 0.5 * x * (1.0 + mx.tanh(0.7978845608028654 * (x + 0.044715 * (x * x * x))))


ACTIVATIONS = {
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_python_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "gelu": nn.gelu,
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# --------------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated per-layer key/value buffers of shape (B, KVH, max_len, D).

    Offset protocol: during one forward call every layer calls ``update(layer, k, v)``, which
    writes the T new entries at ``[offset, offset + T)`` and returns the filled prefix.  The
    offset does *not* move inside ``update``; the model calls ``advance(T)`` once after the last
    layer.  So ``offset`` always equals the number of tokens stored, and the key_mask passed to
    the next call must have ``offset + T`` columns.
    """

    def __init__(self, num_layers, batch, num_kv_heads, max_len, head_dim, dtype=mx.float32):
        self.num_layers = num_layers
        self.batch = batch
        self.num_kv_heads = num_kv_heads
        self.max_len = max_len
        self.head_dim = head_dim
        self.dtype = dtype
        self.offset = 0
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.keys = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.values = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]

    def update(self, layer_idx: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """k, v: (B, KVH, T, D) -> all keys/values so far, (B, KVH, offset + T, D)."""
        end = self.offset + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: {end} tokens > max_len {self.max_len}")
        self.keys[layer_idx][:, :, self.offset : end, :] = k.astype(self.dtype)
        self.values[layer_idx][:, :, self.offset : end, :] = v.astype(self.dtype)
        return self.keys[layer_idx][:, :, :end, :], self.values[layer_idx][:, :, :end, :]

    def advance(self, n: int) -> None:
        self.offset += n

    def repeat(self, n: int) -> KVCache:
        """New cache where row b becomes rows b*n .. b*n+n-1 (n samples share one prefill)."""
        out = KVCache.__new__(KVCache)
        out.__dict__.update(self.__dict__)
        out.batch = self.batch * n
        out.keys = [mx.repeat(x, n, axis=0) for x in self.keys]
        out.values = [mx.repeat(x, n, axis=0) for x in self.values]
        return out

    def take(self, rows: mx.array) -> KVCache:
        """New cache of only the rows `rows` (the batch compacts when samples finish)."""
        out = KVCache.__new__(KVCache)
        out.__dict__.update(self.__dict__)
        out.batch = rows.shape[0]
        out.keys = [x[rows] for x in self.keys]
        out.values = [x[rows] for x in self.values]
        return out

    @property
    def state(self) -> list[mx.array]:
        """All buffers, for ``mx.eval(cache.state)``."""
        return self.keys + self.values


def make_cache(model, batch: int, max_len: int, dtype=None) -> KVCache:
    """KVCache sized for ``model`` (dtype defaults to the model's activation dtype)."""
    dtype = dtype if dtype is not None else model.dtype
    return KVCache(model.num_layers, batch, model.num_kv_heads, max_len, model.head_dim, dtype)


# --------------------------------------------------------------------------- weights


def load_weights(model_dir: str) -> dict[str, mx.array]:
    """All tensors of every ``*.safetensors`` file in ``model_dir`` (sharded or not)."""
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(mx.load(f))
    return weights


def normalise_keys(
    arch: str, weights: dict[str, mx.array], tie_word_embeddings: bool = True
) -> dict[str, mx.array]:
    """Map checkpoint keys to our parameter names, which equal transformers' module paths.

    GPT-2: original OpenAI-style checkpoints have no ``transformer.`` prefix and may carry the
    non-parameter ``attn.bias`` / ``attn.masked_bias`` buffers; both layouts become
    ``transformer.h.0.attn.c_attn.weight`` etc.  The others: base-model checkpoints lack
    ``model.``.
    A tied ``lm_head.weight`` is dropped (the head reads the embedding); an untied head's
    tensors (with ``.scales``/``.biases`` when quantized) keep their names.
    """
    from . import ARCHITECTURES  # local import: models/__init__ imports this module

    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported model_type {arch!r}; supported: {sorted(ARCHITECTURES)}")
    prefix = "transformer." if arch == "gpt2" else "model."
    out = {}
    for key, value in weights.items():
        if key.startswith("lm_head."):
            if not tie_word_embeddings:
                out[key] = value
            continue
        if arch == "gpt2" and key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of old checkpoints, not parameters
        if key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from the config
        if not key.startswith(prefix):
            key = prefix + key
        out[key] = value
    return out


def check_keys(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Strict load check: raise naming missing / unexpected keys and shape mismatches."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match model: missing={missing} unexpected={unexpected}"
        )
    bad = [
        f"{k}: checkpoint {tuple(w.shape)} vs model {tuple(expected[k].shape)}"
        for k, w in weights.items()
        if tuple(w.shape) != tuple(expected[k].shape)
    ]
    if bad:
        raise ValueError("shape mismatch: " + "; ".join(bad))


def quantize_as_stored(model: nn.Module, quantization: dict, weights: dict) -> None:
    """Turn into quantized layers the modules whose checkpoint tensors come quantized (a
    ``.scales`` next to the packed ``.weight``, mlx-lm's layout), with config.json's
    "quantization" settings: group_size, bits, mode, and per-module overrides."""

    def stored_quantized(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        own = quantization.get(path)
        return own if isinstance(own, dict) else True

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=stored_quantized,
    )


def load_model(model_dir: str, dtype=None) -> nn.Module:
    """config.json + safetensors -> model; casts floating parameters to ``dtype`` if given.
    A checkpoint mlx-lm quantized loads into quantized layers (see quantize_as_stored)."""
    from . import build_model  # local import: models/__init__ imports this module

    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    model = build_model(config)
    weights = normalise_keys(
        # The model's own reading: transformers' default differs per family (tied for GPT-2
        # and Gemma, untied for Llama, Mistral, Qwen and Phi-3).
        config["model_type"],
        load_weights(model_dir),
        getattr(model, "tie_word_embeddings", True),
    )
    if isinstance(config.get("quantization"), dict):
        quantize_as_stored(model, config["quantization"], weights)
    check_keys(model, weights)
    model.load_weights(list(weights.items()), strict=True)
    if dtype is not None:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model
