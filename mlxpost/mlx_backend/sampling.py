"""Batched sampling with a preallocated KV cache, mirroring torch_backend/sampling.py.

The decode loop keeps the device busy and the host out of the way: each step's graph is
handed to MLX with `mx.async_eval` (the host builds the next step while this one runs), the
token choice is one compiled function, the host reads the finished flags only every
`sync_every` tokens, and rows that finished are then retired (the batch compacts) once they are
at least a quarter of it. Tokens are drawn by inverse transform sampling from one uniform
number per original row and step (not `mx.random.categorical`'s N x V Gumbel noise), so the
samples do not depend on when rows are retired.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from mlxpost.backend import Samples, SamplingConfig
from mlxpost.backend_shared.sampling import assemble, left_pad, new_token_budget
from mlxpost.mlx_backend.modeling import MLXModel, positions
from mlxpost.mlx_backend.models.common import make_cache

NEG_INF = float("-inf")
SYNC_EVERY = 8  # tokens between host reads of the finished flags
RETIRE_SHARE = 0.25  # compact the batch once this share of its rows has finished


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


def choose(logits: mx.array, cfg: SamplingConfig, uniform: mx.array | None):
    """Next tokens (N,) and their behaviour logprobs under log_softmax(logits / T).

    uniform: (N,) draws from [0, 1), one per row. A row's token is where its draw falls in the
    cumulative distribution of its (filtered) probabilities (inverse transform sampling), as in
    the torch sampler, so it depends only on that row's draw."""
    logits = logits.astype(mx.float32)
    scaled = logits / cfg.temperature if cfg.temperature not in (0, 1) else logits
    logp = scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)
    if cfg.temperature == 0:
        token = mx.argmax(logits, axis=-1)
    else:
        if cfg.top_k > 0 or cfg.top_p < 1.0:
            probs = mx.softmax(filter_logits(scaled, cfg.top_k, cfg.top_p), axis=-1)
        else:
            probs = mx.exp(logp)
        token = inverse_cdf(probs, uniform)
    token = token.astype(mx.int32)
    return token, mx.take_along_axis(logp, token[:, None], -1)[:, 0]


def inverse_cdf(probs: mx.array, uniform: mx.array) -> mx.array:
    """The first token whose cumulative probability exceeds uniform x the row's total (the
    count of tokens whose cumulative probability does not). Scaling by the computed total keeps
    rounding in the sum from leaving the draw past the end; a token of probability 0 adds
    nothing to the sum, so it is never the first to pass."""
    cdf = mx.cumsum(probs, axis=-1)
    target = uniform[:, None] * cdf[:, -1:]
    token = (cdf <= target).astype(mx.int32).sum(axis=-1)
    return mx.minimum(token, probs.shape[-1] - 1)


def chooser(cfg: SamplingConfig):
    """choose() for this config, compiled once per batch shape."""
    return mx.compile(lambda logits, uniform: choose(logits, cfg, uniform))


def sample(
    model: MLXModel,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    eos_ids: Sequence[int],
    pad_id: int,
    seed: int,
    on_token: Callable[[np.ndarray], None] | None = None,
    sync_every: int = SYNC_EVERY,
) -> Samples:
    """Sample cfg.n completions per prompt. `on_token`, when given, is called after every
    step with that step's (N,) int32 token row (pad_id in rows already finished), so a
    caller can stream the tokens; it changes nothing sampled. `sync_every` (tokens between
    checks for EOS) changes only the speed, never the tokens."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    budget = new_token_budget(model.config, prompt_ids.shape[1], cfg.max_new_tokens)
    ids, mask = mx.array(prompt_ids), mx.array(prompt_mask)
    key = mx.random.key(seed)
    eos = mx.array(list(eos_ids), dtype=mx.int32)
    module = model.module
    pick = chooser(cfg)

    cache = make_cache(module, ids.shape[0], ids.shape[1] + budget)
    hidden = module(ids, positions(mask), mask, cache)
    logits = module.lm_logits(hidden[:, -1:, :])[:, 0]  # (B, V)
    next_position = positions(mask)[:, -1] + 1  # (B,)
    if cfg.n > 1:  # every sample of a prompt reuses that prompt's prefill
        cache = cache.repeat(cfg.n)
        logits = mx.repeat(logits, cfg.n, axis=0)
        mask = mx.repeat(mask, cfg.n, axis=0)
        next_position = mx.repeat(next_position, cfg.n, axis=0)

    total = logits.shape[0]
    rows = np.arange(total)  # the original row of each batch row (the host decides retirements)
    done = mx.zeros((total,), dtype=mx.bool_)
    steps = []  # (rows, token, logp, live) per step, over the rows then in the batch
    uniform = None
    for step in range(budget):
        key, step_key = mx.random.split(key)
        if cfg.temperature > 0:  # a draw for every original row: retiring rows keeps the stream
            uniform = mx.random.uniform(shape=(total,), key=step_key)
            if rows.shape[0] < total:
                uniform = uniform[mx.array(rows)]
        token, logp = pick(logits, uniform)
        token = mx.where(done, pad_id, token)
        steps.append((rows, token, logp, mx.logical_not(done)))
        done = mx.logical_or(done, (token[:, None] == eos[None, :]).any(axis=-1))
        mx.async_eval(token, logp, done)
        if on_token is not None:
            row = np.full(total, pad_id, dtype=np.int32)
            row[rows] = np.array(token)
            on_token(row)
        if step == budget - 1:
            break
        if (step + 1) % sync_every == 0 or on_token is not None:
            finished = np.array(done)
            if finished.all():
                break
            if finished.sum() >= RETIRE_SHARE * finished.shape[0]:
                keep = mx.array(np.flatnonzero(~finished))
                cache = cache.take(keep)
                rows = rows[np.flatnonzero(~finished)]
                done, token, mask = done[keep], token[keep], mask[keep]
                next_position = next_position[keep]
        mask = mx.concatenate([mask, mx.ones_like(mask[:, :1])], axis=1)
        hidden = module(token[:, None], next_position[:, None], mask, cache)
        logits = module.lm_logits(hidden)[:, 0]
        next_position = next_position + 1

    tokens = np.full((total, len(steps)), pad_id, dtype=np.int32)
    logprobs = np.zeros((total, len(steps)), dtype=np.float32)
    live = np.zeros((total, len(steps)), dtype=bool)
    for column, (step_rows, token, logp, alive) in enumerate(steps):
        tokens[step_rows, column] = np.array(token)
        logprobs[step_rows, column] = np.array(logp)
        live[step_rows, column] = np.array(alive)
    width = int(np.flatnonzero(live.any(axis=0)).max()) + 1  # up to the last EOS, as generated
    return assemble(
        prompt_ids,
        prompt_mask,
        tokens[:, :width],
        logprobs[:, :width],
        live[:, :width],
        cfg.n,
        eos_ids,
        pad_id,
    )
