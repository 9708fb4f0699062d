"""The Llama-like decoder families in MLX, numerically matching transformers' eager code.

One implementation serves llama, mistral, qwen2, qwen3, gemma2, gemma3_text and phi3; what differs
between them is a `Family` record (which biases, norms, fused projections and scales a family
has). The config is read through transformers' own config class for the model type, so old and
new config.json layouts (``rope_scaling`` + ``rope_theta`` or ``rope_parameters``, gemma3's
``rope_local_base_freq`` and ``sliding_window_pattern``, qwen's ``use_sliding_window`` and
``max_window_layers``) mean here what they mean there.

Conventions: parameter names equal transformers' module paths
(``model.layers.0.self_attn.q_proj.weight``), per-token positions for left-padded batches,
RoPE angles in float32 rounded to the activation dtype, eager attention with the softmax in
float32, sliding windows applied per layer from ``layer_types``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .common import KVCache, attention, attention_bias, get_activation
from .gpt2 import checkpointed_block

ROPE_TYPES = ("default", "linear", "llama3", "longrope")


@dataclass(frozen=True)
class Family:
    qkv_bias: str = "attention_bias"  # "attention_bias" (q,k,v,o by config), "qkv" (q,k,v always)
    mlp_bias: bool = False  # llama's config.mlp_bias
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys, before RoPE
    fused: bool = False  # phi3: qkv_proj and gate_up_proj
    gemma: bool = False  # (1 + w) float32 norms, sandwich norms, scaled embeddings
    all_sliding: bool = False  # one window on every layer when config.sliding_window is set
    # The torch backend runs transformers' eager attention (Gemma-2's soft-capped scores need
    # it), whose bfloat16 roundings of scores and probabilities are followed here; the other
    # families run on sdpa, whose float32 arithmetic is followed instead.
    eager: bool = False


FAMILIES = {
    "llama": Family(mlp_bias=True),
    "mistral": Family(qkv_bias="none", all_sliding=True),
    "qwen2": Family(qkv_bias="qkv"),
    "qwen3": Family(qk_norm=True),
    "gemma2": Family(gemma=True, eager=True),
    "gemma3_text": Family(qk_norm=True, gemma=True),
    "phi3": Family(qkv_bias="none", fused=True, all_sliding=True),
}


# --------------------------------------------------------------------------- config


def read_config(config: dict):
    """config.json as transformers' config object for its model type (no weights, no torch)."""
    from transformers import CONFIG_MAPPING
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # validation warnings are for transformers' own users
    values = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    return CONFIG_MAPPING[config["model_type"]](**values)


def layer_types(cfg, family: Family) -> list[str]:
    n = cfg.num_hidden_layers
    if getattr(cfg, "layer_types", None):
        return list(cfg.layer_types)
    sliding = family.all_sliding and getattr(cfg, "sliding_window", None) is not None
    return ["sliding_attention" if sliding else "full_attention"] * n


def rope_parameters(cfg, layer_type: str) -> dict:
    params = dict(cfg.rope_parameters or {})
    if layer_type in params and isinstance(params[layer_type], dict):
        params = dict(params[layer_type])  # gemma3: one set per layer type
    return params


def inv_freq_and_scale(cfg, params: dict, dim: int, long: bool = False) -> tuple[mx.array, float]:
    """Inverse frequencies (dim/2,) float32 and the cos/sin multiplier of one rope parameter set,
    computed as transformers' ROPE_INIT_FUNCTIONS compute them."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    base = float(params["rope_theta"])
    exponents = mx.arange(0, dim, 2).astype(mx.float32) / dim
    inv_freq = 1.0 / (base**exponents)
    scale = 1.0
    if rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif rope_type == "llama3":
        factor = params["factor"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = mx.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = mx.logical_not(wavelen < old_len / high) & mx.logical_not(wavelen > old_len / low)
        inv_freq = mx.where(medium, smoothed, scaled)
    elif rope_type == "longrope":
        original = original_context(cfg, params)
        factor = params.get("factor") or cfg.max_position_embeddings / original
        scale = params.get("attention_factor")
        if scale is None:
            scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        ext = mx.array(params["long_factor" if long else "short_factor"], dtype=mx.float32)
        inv_freq = 1.0 / (ext * base**exponents)
    return inv_freq, float(scale)


def original_context(cfg, params: dict) -> int:
    return int(
        params.get("original_max_position_embeddings")
        or getattr(cfg, "original_max_position_embeddings", None)
        or cfg.max_position_embeddings
    )


class Rope:
    """cos/sin of one rope parameter set for (B, T) positions, over the first `dim` channels."""

    def __init__(self, cfg, params: dict, dim: int):
        self.dim = dim
        self.inv_freq, self.scale = inv_freq_and_scale(cfg, params, dim)
        self.long = None
        if params.get("rope_type", params.get("type")) == "longrope":
            # transformers switches to the long factors for a whole forward call once its
            # largest position reaches the original context.
            self.long = inv_freq_and_scale(cfg, params, dim, long=True)[0]
            self.original = original_context(cfg, params)

    def __call__(self, positions: mx.array, dtype):
        inv_freq = self.inv_freq
        if self.long is not None:
            inv_freq = mx.where(mx.max(positions) + 1 > self.original, self.long, inv_freq)
        freqs = positions.astype(mx.float32)[..., None] * inv_freq  # (B, T, dim/2)
        emb = mx.concatenate([freqs, freqs], axis=-1)  # (B, T, dim)
        cos, sin = mx.cos(emb), mx.sin(emb)
        if self.scale != 1.0:
            cos, sin = cos * self.scale, sin * self.scale
        return cos.astype(dtype)[:, None], sin.astype(dtype)[:, None]  # (B, 1, T, dim)


def rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    dim = cos.shape[-1]
    if dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :dim], x[..., dim:]  # partial rotary: the tail passes through
    return mx.concatenate([rot * cos + rotate_half(rot) * sin, rest], axis=-1)


# --------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalise in float32, round to the input dtype, then scale."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        xf = x.astype(mx.float32)
        normed = xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight * normed.astype(x.dtype)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: normalise and scale by (1 + w) in float32, round once at the end."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = mx.zeros((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        xf = x.astype(mx.float32)
        out = xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (out * (1.0 + self.weight.astype(mx.float32))).astype(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg, family: Family, layer_idx: int, head_dim: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads or self.n_heads
        self.head_dim = head_dim
        hidden = cfg.hidden_size
        q_out, kv_out = self.n_heads * head_dim, self.n_kv_heads * head_dim
        if family.qkv_bias == "qkv":
            qkv_bias, o_bias = True, False
        elif family.qkv_bias == "none":
            qkv_bias = o_bias = False
        else:
            qkv_bias = o_bias = bool(getattr(cfg, "attention_bias", False))
        if family.fused:
            self.qkv_proj = nn.Linear(hidden, q_out + 2 * kv_out, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(hidden, q_out, bias=qkv_bias)
            self.k_proj = nn.Linear(hidden, kv_out, bias=qkv_bias)
            self.v_proj = nn.Linear(hidden, kv_out, bias=qkv_bias)
        self.o_proj = nn.Linear(q_out, hidden, bias=o_bias)
        if family.qk_norm:
            norm = GemmaRMSNorm if family.gemma else RMSNorm
            self.q_norm = norm(head_dim, cfg.rms_norm_eps)
            self.k_norm = norm(head_dim, cfg.rms_norm_eps)
        object.__setattr__(self, "_fused", family.fused)
        object.__setattr__(self, "_qk_norm", family.qk_norm)
        object.__setattr__(self, "_eager", family.eager)
        if family.gemma:
            self.scale = cfg.query_pre_attn_scalar**-0.5
            self.softcap = getattr(cfg, "attn_logit_softcapping", None)
        else:
            self.scale = head_dim**-0.5
            self.softcap = None

    def __call__(self, x, cos, sin, bias, cache: KVCache | None):
        B, T, _ = x.shape
        if self._fused:
            qkv = self.qkv_proj(x)
            q_out = self.n_heads * self.head_dim
            kv_out = self.n_kv_heads * self.head_dim
            q, k, v = qkv[..., :q_out], qkv[..., q_out : q_out + kv_out], qkv[..., q_out + kv_out :]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, T, self.n_heads, self.head_dim)
        k = k.reshape(B, T, self.n_kv_heads, self.head_dim)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim)
        if self._qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, KVH, S, D)
        out = attention(q, k, v, bias, self.scale, self.softcap, float32=not self._eager)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg, family: Family):
        super().__init__()
        hidden, inter = cfg.hidden_size, cfg.intermediate_size
        bias = family.mlp_bias and bool(getattr(cfg, "mlp_bias", False))
        if family.fused:
            self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
        else:
            self.gate_proj = nn.Linear(hidden, inter, bias=bias)
            self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
        object.__setattr__(self, "_act", get_activation(act))
        object.__setattr__(self, "_fused", family.fused)

    def __call__(self, x):
        if self._fused:
            gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self._act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg, family: Family, layer_idx: int, head_dim: int, layer_type: str):
        super().__init__()
        norm = GemmaRMSNorm if family.gemma else RMSNorm
        hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.sliding = layer_type == "sliding_attention"
        self.self_attn = Attention(cfg, family, layer_idx, head_dim)
        self.mlp = MLP(cfg, family)
        self.input_layernorm = norm(hidden, eps)
        self.post_attention_layernorm = norm(hidden, eps)
        object.__setattr__(self, "_sandwich", family.gemma)
        if family.gemma:
            self.pre_feedforward_layernorm = norm(hidden, eps)
            self.post_feedforward_layernorm = norm(hidden, eps)

    def __call__(self, x, cos, sin, bias, cache):
        h = self.self_attn(self.input_layernorm(x), cos, sin, bias, cache)
        if self._sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    """The ``model.`` submodule: embedding, decoder layers, final norm."""

    def __init__(self, cfg, family: Family, head_dim: int, types: list[str]):
        super().__init__()
        norm = GemmaRMSNorm if family.gemma else RMSNorm
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [
            DecoderLayer(cfg, family, i, head_dim, types[i]) for i in range(cfg.num_hidden_layers)
        ]
        self.norm = norm(cfg.hidden_size, cfg.rms_norm_eps)


class Model(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        family = FAMILIES[config["model_type"]]
        cfg = read_config(config)
        if getattr(cfg, "use_bidirectional_attention", False):
            raise ValueError(f"{config['model_type']} with use_bidirectional_attention")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        types = layer_types(cfg, family)
        # Plain attributes, kept out of the parameter tree (nn.Module registers dicts/lists).
        object.__setattr__(self, "_config", dict(config))
        object.__setattr__(self, "_family", family)
        object.__setattr__(self, "_sliding_window", getattr(cfg, "sliding_window", None))
        object.__setattr__(self, "_final_softcap", getattr(cfg, "final_logit_softcapping", None))
        ropes = {}
        for layer_type in sorted(set(types)):
            params = rope_parameters(cfg, layer_type)
            partial = params.get("partial_rotary_factor") or getattr(
                cfg, "partial_rotary_factor", None
            )
            dim = int(head_dim * (partial or 1.0))
            ropes[layer_type] = Rope(cfg, params, dim)
        object.__setattr__(self, "_ropes", ropes)
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = head_dim
        self.hidden_size = cfg.hidden_size
        self.model = Body(cfg, family, head_dim, types)
        self.tie_word_embeddings = bool(cfg.tie_word_embeddings)
        self.grad_checkpoint = False  # layers recomputed in the backward pass (no cache only)
        if not self.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def config(self) -> dict:
        return self._config

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    def __call__(self, input_ids, positions=None, key_mask=None, cache: KVCache | None = None):
        """input_ids, positions: int (B, T); key_mask: (B, offset + T). Returns (B, T, hidden).

        With a cache, the new keys go to slots [cache.offset, cache.offset + T) and the offset is
        advanced by T after the last layer.
        """
        B, T = input_ids.shape
        offset = cache.offset if cache is not None else 0
        if positions is None:
            positions = mx.broadcast_to(mx.arange(offset, offset + T)[None], (B, T))
        emb = self.model.embed_tokens
        x = emb(input_ids)  # (B, T, hidden)
        if self._family.gemma:
            # sqrt(hidden) as a float32 scalar rounded to the weight dtype, as transformers does.
            scale = mx.array(math.sqrt(self.hidden_size), dtype=mx.float32).astype(x.dtype)
            x = x * scale
        rope = {kind: r(positions, x.dtype) for kind, r in self._ropes.items()}
        windows = {"full_attention": None, "sliding_attention": self._sliding_window}
        biases = {
            kind: attention_bias(key_mask, offset, T, B, windows[kind]) for kind in self._ropes
        }
        for layer in self.model.layers:
            kind = "sliding_attention" if layer.sliding else "full_attention"
            cos, sin = rope[kind]
            if self.grad_checkpoint and cache is None:
                x = checkpointed_block(layer, x, cos, sin, biases[kind])
            else:
                x = layer(x, cos, sin, biases[kind], cache)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(x)

    def head_module(self) -> nn.Module:
        """The module lm_logits computes with (its parameters are the head's)."""
        return self.model.embed_tokens if self.tie_word_embeddings else self.lm_head

    def lm_logits(self, hidden: mx.array) -> mx.array:
        """(B, T, hidden) -> (B, T, V) logits in the model dtype (soft-capped where configured)."""
        if self.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(hidden)
        else:
            logits = self.lm_head(hidden)
        cap = self._final_softcap
        if cap is not None:
            logits = mx.tanh(logits / cap) * cap
        return logits
