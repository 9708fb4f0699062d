"""Gemma-2 causal LM in MLX, numerically matching transformers' Gemma2ForCausalLM (eager).

Gemma-2 specifics reproduced here: RMSNorm in float32 scaled by (1 + weight); embeddings
multiplied by sqrt(hidden_size) rounded to the model dtype; four norms per layer (pre/post
attention and pre/post MLP); attention scaled by query_pre_attn_scalar**-0.5 with tanh
soft-capping of the scores; grouped-query attention; sliding-window attention on the layers
marked "sliding_attention" in ``layer_types``; tanh soft-capping of the final logits.
Parameter names equal transformers' module paths (``model.layers.0.self_attn.q_proj.weight``).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .common import KVCache, attention, attention_bias, get_activation


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = mx.zeros((dims,))  # zero-centred: the scale is (1 + weight)

    def __call__(self, x: mx.array) -> mx.array:
        # Like Gemma2RMSNorm: normalise and scale in float32, round once at the end
        # ((x * w).to(dtype), not x.to(dtype) * w as in Llama).
        xf = x.astype(mx.float32)
        out = xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (out * (1.0 + self.weight.astype(mx.float32))).astype(x.dtype)


def rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class Attention(nn.Module):
    def __init__(self, cfg: dict, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg["num_attention_heads"]
        self.n_kv_heads = cfg["num_key_value_heads"]
        self.head_dim = cfg["head_dim"]
        self.scale = cfg["query_pre_attn_scalar"] ** -0.5  # not head_dim**-0.5
        self.softcap = cfg.get("attn_logit_softcapping")
        hidden, bias = cfg["hidden_size"], bool(cfg.get("attention_bias", False))
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=bias)

    def __call__(self, x, cos, sin, bias, cache: KVCache | None):
        B, T, _ = x.shape
        # (B, T, H*D) -> (B, T, H, D) -> (B, H, T, D)
        q = self.q_proj(x).reshape(B, T, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        # RoPE with per-token positions (cos/sin: (B, 1, T, D)), rotate-half convention.
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, KVH, S, D)
        out = attention(q, k, v, bias, self.scale, self.softcap)  # (B, H, T, D)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        # Older configs spell it hidden_act; transformers uses hidden_activation.
        self.act = get_activation(
            cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        )

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict, layer_idx: int):
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        hidden = cfg["hidden_size"]
        self.sliding = cfg["layer_types"][layer_idx] == "sliding_attention"
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)

    def __call__(self, x, cos, sin, bias, cache):
        # "Sandwich" norms: both sub-blocks are normalised on the way in and on the way out.
        h = self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), cos, sin, bias, cache)
        )
        x = x + h
        h = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x + h


class Gemma2Body(nn.Module):
    """The ``model.`` submodule: scaled embedding, decoder layers, final norm."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg["num_hidden_layers"])]
        self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6))


def _normalise_config(config: dict) -> dict:
    cfg = dict(config)
    n = cfg["num_hidden_layers"]
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    if cfg.get("head_dim") is None:
        cfg["head_dim"] = 256  # transformers' default, not hidden / heads
    if cfg.get("query_pre_attn_scalar") is None:
        cfg["query_pre_attn_scalar"] = 256  # transformers' default
    if cfg.get("layer_types") is None:
        # transformers' default: layers 0, 2, 4, ... slide, odd layers are global.
        cfg["layer_types"] = [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)
        ]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"gemma2: rope_type {rope_type!r} is not supported (only 'default')")
    cfg["rope_theta"] = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("gemma2 with use_bidirectional_attention is not supported")
    return cfg


class Model(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        cfg = _normalise_config(config)
        # Plain attributes, kept out of the parameter tree (nn.Module registers dicts/lists).
        object.__setattr__(self, "_config", dict(config))
        object.__setattr__(self, "_sliding_window", cfg.get("sliding_window"))
        object.__setattr__(self, "_final_softcap", cfg.get("final_logit_softcapping"))
        self.num_layers = cfg["num_hidden_layers"]
        self.num_kv_heads = cfg["num_key_value_heads"]
        self.head_dim = cfg["head_dim"]
        self.hidden_size = cfg["hidden_size"]
        # RoPE inverse frequencies, float32 as in Gemma2RotaryEmbedding (underscore: not a parameter).
        exponents = mx.arange(0, self.head_dim, 2, dtype=mx.float32) / self.head_dim
        object.__setattr__(self, "_inv_freq", 1.0 / (cfg["rope_theta"] ** exponents))  # (D/2,)
        self.model = Gemma2Body(cfg)
        self.tie_word_embeddings = cfg.get("tie_word_embeddings", True)
        if not self.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)

    @property
    def config(self) -> dict:
        return self._config

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    def _rope(self, positions: mx.array, dtype):
        # Angles in float32 from the (B, T) positions, then cos/sin rounded to the model dtype.
        freqs = positions.astype(mx.float32)[..., None] * self._inv_freq  # (B, T, D/2)
        emb = mx.concatenate([freqs, freqs], axis=-1)  # (B, T, D)
        cos = mx.cos(emb).astype(dtype)[:, None]  # (B, 1, T, D): broadcast over heads
        sin = mx.sin(emb).astype(dtype)[:, None]
        return cos, sin

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
        # sqrt(hidden) is a float32 scalar rounded to the weight dtype before the multiply
        # (in bfloat16 sqrt(3072) = 55.4256 becomes 55.5, as in transformers).
        scale = mx.array(math.sqrt(self.hidden_size), dtype=mx.float32).astype(emb.weight.dtype)
        x = emb(input_ids) * scale  # (B, T, hidden)
        cos, sin = self._rope(positions, x.dtype)
        full_bias = attention_bias(key_mask, offset, T, B)  # (B, 1, T, S)
        slide_bias = attention_bias(key_mask, offset, T, B, self._sliding_window)
        for layer in self.model.layers:
            x = layer(x, cos, sin, slide_bias if layer.sliding else full_bias, cache)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(x)

    def lm_logits(self, hidden: mx.array) -> mx.array:
        """(B, T, hidden) -> soft-capped (B, T, V) logits in the model dtype."""
        if self.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(hidden)
        else:
            logits = self.lm_head(hidden)
        cap = self._final_softcap
        if cap is not None:
            logits = mx.tanh(logits / cap) * cap
        return logits
