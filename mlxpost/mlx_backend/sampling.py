"""Batched sampling with a KV cache, mirroring torch_backend/sampling.py."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from mlxpost.backend import Samples, SamplingConfig
from mlxpost.backend_shared.sampling import assemble, left_pad, new_token_budget
from mlxpost.mlx_backend.modeling import MLXModel, positions
from mlxpost.mlx_backend.models.common import make_cache

NEG_INF = float("-inf")


def filter_logits(scaled: mx.array, top_k: int, top_p: float) -> mx.array:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus."""
    if top_k > 0 and top_k < scaled.shape[-1]:
        kth = mx.sort(scaled, axis=-1)[..., -top_k][..., None]
        scaled = mx.where(scaled < kth, NEG_INF, scaled)
    if top_p < 1.0:
        order = mx.argsort(-scaled, axis=-1)
        sorted_logits = mx.take_along_axis(scaled, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        # Drop a token when the mass before it already reaches top_p; the first always stays.
        mass_before = mx.cumsum(probs, axis=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = mx.put_along_axis(mx.zeros_like(drop_sorted), order, drop_sorted, axis=-1)
        scaled = mx.where(drop, NEG_INF, scaled)
    return scaled


def choose(logits: mx.array, cfg: SamplingConfig, key: mx.array):
    """Next tokens (N,) and their behaviour logprobs under log_softmax(logits / T)."""
    logits = logits.astype(mx.float32)
    if cfg.temperature == 0:
        token = mx.argmax(logits, axis=-1)
        scaled = logits
    else:
        scaled = logits / cfg.temperature
        token = mx.random.categorical(filter_logits(scaled, cfg.top_k, cfg.top_p), key=key)
    logp = scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)
    return token.astype(mx.int32), mx.take_along_axis(logp, token[:, None].astype(mx.int32), -1)[
        :, 0
    ]


def sample(
    model: MLXModel,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    eos_ids: Sequence[int],
    pad_id: int,
    seed: int,
    on_token: Callable[[np.ndarray], None] | None = None,
) -> Samples:
    """Sample cfg.n completions per prompt. `on_token`, when given, is called after every
    step with that step's (N,) int32 token row (pad_id in rows already finished), so a
    caller can stream the tokens; it changes nothing sampled."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    budget = new_token_budget(model.config, prompt_ids.shape[1], cfg.max_new_tokens)
    ids, mask = mx.array(prompt_ids), mx.array(prompt_mask)
    key = mx.random.key(seed)
    eos = mx.array(list(eos_ids), dtype=mx.int32)
    module = model.module

    cache = make_cache(module, ids.shape[0], ids.shape[1] + budget)
    hidden = module(ids, positions(mask), mask, cache)
    logits = module.lm_logits(hidden[:, -1:, :])[:, 0]  # (B, V)
    next_position = positions(mask)[:, -1] + 1  # (B,)
    if cfg.n > 1:  # every sample of a prompt reuses that prompt's prefill
        cache = cache.repeat(cfg.n)
        logits = mx.repeat(logits, cfg.n, axis=0)
        mask = mx.repeat(mask, cfg.n, axis=0)
        next_position = mx.repeat(next_position, cfg.n, axis=0)

    done = mx.zeros((logits.shape[0],), dtype=mx.bool_)
    tokens, logprobs, live = [], [], []
    for step in range(budget):
        key, step_key = mx.random.split(key)
        token, logp = choose(logits, cfg, step_key)
        token = mx.where(done, pad_id, token)
        tokens.append(token)
        logprobs.append(logp)
        live.append(mx.logical_not(done))
        done = mx.logical_or(done, (token[:, None] == eos[None, :]).any(axis=-1))
        mx.eval(done, token, logp)
        if on_token is not None:
            on_token(np.array(token))
        if bool(done.all()) or step == budget - 1:
            break
        mask = mx.concatenate([mask, mx.ones_like(mask[:, :1])], axis=1)
        hidden = module(token[:, None], next_position[:, None], mask, cache)
        logits = module.lm_logits(hidden)[:, 0]
        next_position = next_position + 1

    def stacked(steps):
        return np.array(mx.stack(steps, axis=1))

    return assemble(
        prompt_ids,
        prompt_mask,
        stacked(tokens),
        stacked(logprobs),
        stacked(live),
        cfg.n,
        eos_ids,
        pad_id,
    )
