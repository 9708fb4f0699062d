"""GPT-2 causal LM in MLX, numerically matching transformers' GPT2LMHeadModel (eager attention).

Parameter names equal transformers' module paths (``transformer.h.0.attn.c_attn.weight``...)
so LoRA adapters can be saved under PEFT key names, and Conv1D weights keep the HF (in, out)
layout so a merged checkpoint can be written back without transposes.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .common import KVCache, attention, attention_bias, get_activation


def checkpointed_block(block: nn.Module, *inputs: mx.array) -> mx.array:
    """block(*inputs, None) through mx.checkpoint (see checkpointed)."""
    return checkpointed(block, lambda *arrays: block(*arrays, None), *inputs)


def checkpointed(module: nn.Module, fn, *inputs: mx.array):
    """fn(*inputs), a computation with `module`, through mx.checkpoint: only the inputs are
    kept for the backward pass, which runs fn again to get its intermediates.

    The module's trainable parameters are inputs of the checkpointed function, so their
    gradients flow through the recomputation; its own parameters are put back after each run,
    so it never keeps the traced copies. Dropout (LoRA's, in training steps) draws its masks
    from one key taken before the call, so the recomputation draws the same masks. Never with
    a KV cache: the cache is written to, which a recomputation would repeat.
    """
    dropouts = [
        (parent, name, child)
        for _, parent in module.named_modules()
        for name, child in parent.items()
        if isinstance(child, nn.Dropout) and child.training and child._p_1 < 1
    ]
    key = None
    if dropouts:  # an mx.random key, (2,) uint32, from the global stream
        key = mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)

    def run(params, *arrays):
        own = module.trainable_parameters()
        module.update(params)
        keys = mx.random.split(key, len(dropouts)) if dropouts else []
        for (parent, name, child), sub in zip(dropouts, keys):
            parent[name] = KeyedDropout(child._p_1, sub)
        try:
            return fn(*arrays)
        finally:
            for parent, name, child in dropouts:
                parent[name] = child
            module.update(own)

    return mx.checkpoint(run)(module.trainable_parameters(), *inputs)


def chained_chunk(module: nn.Module, fn, rows: mx.array, chain: dict) -> list[mx.array]:
    """fn(rows) -> list of arrays, a computation with `module` whose intermediates are
    recomputed in the backward pass, evaluated strictly after the previous chunk of the same
    `chain` (a dict the chunks share): its input waits for the previous chunk's outputs in
    the forward pass, and its recomputation for the previous recomputation's input gradient
    in the backward. MLX would otherwise schedule the independent chunks as it likes, holding
    many chunks' intermediates at once. Not with dropout inside fn (see checkpointed)."""
    names = [name for name, _ in tree_flatten(module.trainable_parameters())]

    def plain(*arrays):
        *params, part = arrays
        own = module.trainable_parameters()
        module.update(tree_unflatten(list(zip(names, params))))
        try:
            return fn(part)
        finally:
            module.update(own)

    @mx.custom_function
    def run(*arrays):
        return plain(*arrays)

    @run.vjp
    def run_vjp(primals, cotangents, outputs):
        single = isinstance(primals, mx.array)  # MLX hands a lone input over as it is
        primals = [primals] if single else list(primals)
        if chain.get("grad") is not None:
            primals[-1] = mx.depends([primals[-1]], chain["grad"])[0]
        _, grads = mx.vjp(plain, primals, list(cotangents))
        chain["grad"] = [grads[-1]]
        return grads[0] if single else tuple(grads)

    if chain.get("outputs") is not None:
        rows = mx.depends([rows], chain["outputs"])[0]
    params = [value for _, value in tree_flatten(module.trainable_parameters())]
    outputs = run(*params, rows)
    chain["outputs"] = list(outputs)
    return outputs


class KeyedDropout(nn.Module):
    """nn.Dropout whose masks come from a given key (split on each call), not the global one."""

    def __init__(self, keep: float, key: mx.array):
        super().__init__()
        object.__setattr__(self, "_keep", keep)
        object.__setattr__(self, "_key", key)  # kept out of the parameter tree

    def __call__(self, x: mx.array) -> mx.array:
        key, sub = mx.random.split(self._key)
        object.__setattr__(self, "_key", key)
        mask = mx.random.bernoulli(self._keep, x.shape, key=sub)
        return (mask * x) * (1 / self._keep)


class Conv1D(nn.Module):
    """transformers' Conv1D: a linear layer whose weight is stored (in, out); y = x @ W + b."""

    def __init__(self, in_features: int, out_features: int, std: float = 0.02):
        super().__init__()
        self.weight = mx.random.normal((in_features, out_features)) * std  # (in, out)
        self.bias = mx.zeros((out_features,))

    def __call__(self, x: mx.array) -> mx.array:
        return x @ self.weight + self.bias


class Attention(nn.Module):
    def __init__(self, cfg: dict, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_embd = cfg["n_embd"]
        self.n_head = cfg["n_head"]
        self.head_dim = self.n_embd // self.n_head
        # Same scaling rules as GPT2Attention.__init__.
        self.scale = 1.0
        if cfg.get("scale_attn_weights", True):
            self.scale = self.head_dim**-0.5
        if cfg.get("scale_attn_by_inverse_layer_idx", False):
            self.scale /= float(layer_idx + 1)
        std = cfg.get("initializer_range", 0.02)
        self.c_attn = Conv1D(self.n_embd, 3 * self.n_embd, std)
        # Residual projections get the GPT-2 paper's 1/sqrt(2 * n_layer) init scaling.
        self.c_proj = Conv1D(self.n_embd, self.n_embd, std / math.sqrt(2 * cfg["n_layer"]))

    def __call__(self, x, bias, cache: KVCache | None):
        B, T, C = x.shape
        qkv = self.c_attn(x)  # (B, T, 3C): q | k | v along the last axis
        q, k, v = mx.split(qkv, 3, axis=-1)  # each (B, T, C)
        # (B, T, C) -> (B, T, H, D) -> (B, H, T, D)
        q = q.reshape(B, T, self.n_head, self.head_dim).transpose(0, 2, 1, 3)
        k = k.reshape(B, T, self.n_head, self.head_dim).transpose(0, 2, 1, 3)
        v = v.reshape(B, T, self.n_head, self.head_dim).transpose(0, 2, 1, 3)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, H, S, D)
        # transformers' GPT-2 eager softmax runs in the activation dtype; we always take it in
        # float32 (identical in float32, slightly more accurate in half precision).
        out = attention(q, k, v, bias, self.scale)  # (B, H, T, D)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, T, H, D) -> (B, T, C)
        return self.c_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        n_embd = cfg["n_embd"]
        inner = cfg.get("n_inner") or 4 * n_embd
        std = cfg.get("initializer_range", 0.02)
        self.c_fc = Conv1D(n_embd, inner, std)
        self.c_proj = Conv1D(inner, n_embd, std / math.sqrt(2 * cfg["n_layer"]))
        self.act = get_activation(cfg.get("activation_function", "gelu_new"))

    def __call__(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: dict, layer_idx: int):
        super().__init__()
        eps = cfg.get("layer_norm_epsilon", 1e-5)
        self.ln_1 = nn.LayerNorm(cfg["n_embd"], eps=eps)
        self.attn = Attention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg["n_embd"], eps=eps)
        self.mlp = MLP(cfg)

    def __call__(self, x, bias, cache):
        # Pre-norm residual block, exactly as GPT2Block.
        x = x + self.attn(self.ln_1(x), bias, cache)
        return x + self.mlp(self.ln_2(x))


class GPT2Body(nn.Module):
    """The ``transformer.`` submodule: embeddings, blocks, final LayerNorm."""

    def __init__(self, cfg: dict):
        super().__init__()
        std = cfg.get("initializer_range", 0.02)
        self.wte = nn.Embedding(cfg["vocab_size"], cfg["n_embd"])
        self.wte.weight = mx.random.normal(self.wte.weight.shape) * std
        self.wpe = nn.Embedding(cfg["n_positions"], cfg["n_embd"])
        self.wpe.weight = mx.random.normal(self.wpe.weight.shape) * std
        self.h = [Block(cfg, i) for i in range(cfg["n_layer"])]
        self.ln_f = nn.LayerNorm(cfg["n_embd"], eps=cfg.get("layer_norm_epsilon", 1e-5))


def _normalise_config(config: dict) -> dict:
    """Resolve GPT-2's alternative key names (config.json may use either spelling)."""
    cfg = dict(config)
    for short, long in (
        ("n_embd", "hidden_size"),
        ("n_layer", "num_hidden_layers"),
        ("n_head", "num_attention_heads"),
    ):
        if short not in cfg and long in cfg:
            cfg[short] = cfg[long]
    # Old checkpoints may have only n_ctx; n_positions is the embedding-table size otherwise.
    if cfg.get("n_positions") is None:
        if cfg.get("n_ctx") is None:
            raise ValueError("gpt2 config needs n_positions (or n_ctx)")
        cfg["n_positions"] = cfg["n_ctx"]
    if cfg.get("add_cross_attention"):
        raise ValueError("gpt2 with add_cross_attention is not supported")
    return cfg


class Model(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        cfg = _normalise_config(config)
        # Plain attributes (not dicts stored in the module tree) so they never show up as
        # parameters: nn.Module registers dict/list attributes as children.
        object.__setattr__(self, "_config", dict(config))
        self.num_layers = cfg["n_layer"]
        self.num_kv_heads = cfg["n_head"]
        self.head_dim = cfg["n_embd"] // cfg["n_head"]
        self.transformer = GPT2Body(cfg)
        self.tie_word_embeddings = cfg.get("tie_word_embeddings", True)
        self.grad_checkpoint = False  # blocks recomputed in the backward pass (no cache only)
        if not self.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg["n_embd"], cfg["vocab_size"], bias=False)

    @property
    def config(self) -> dict:
        return self._config

    @property
    def dtype(self):
        return self.transformer.wte.weight.dtype

    def __call__(self, input_ids, positions=None, key_mask=None, cache: KVCache | None = None):
        """input_ids, positions: int (B, T); key_mask: (B, offset + T). Returns (B, T, C).

        With a cache, the new keys go to slots [cache.offset, cache.offset + T) and the offset is
        advanced by T after the last block.
        """
        B, T = input_ids.shape
        offset = cache.offset if cache is not None else 0
        if positions is None:
            positions = mx.broadcast_to(mx.arange(offset, offset + T)[None], (B, T))
        # Padding positions may be anything (e.g. cumsum(mask) - 1 = -1); clamp so the table
        # lookup stays in range. Real positions must be < n_positions, as in transformers.
        positions = mx.maximum(positions, 0)
        body = self.transformer
        x = body.wte(input_ids) + body.wpe(positions)  # (B, T, C)
        bias = attention_bias(key_mask, offset, T, B)  # (B, 1, T, S), shared by all blocks
        for block in body.h:
            if self.grad_checkpoint and cache is None:
                x = checkpointed_block(block, x, bias)
            else:
                x = block(x, bias, cache)
        if cache is not None:
            cache.advance(T)
        return body.ln_f(x)

    def head_module(self) -> nn.Module:
        """The module lm_logits computes with (its parameters are the head's)."""
        return self.transformer.wte if self.tie_word_embeddings else self.lm_head

    def lm_logits(self, hidden: mx.array) -> mx.array:
        """(B, T, C) -> (B, T, V) through the (tied) embedding, in the model dtype."""
        if self.tie_word_embeddings:
            return self.transformer.wte.as_linear(hidden)
        return self.lm_head(hidden)
