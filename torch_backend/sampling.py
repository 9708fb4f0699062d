"""Batched sampling with a preallocated KV cache, mirroring mlxpost/mlx_backend/sampling.py.

The decode loop runs the trainer's own transformers modules (`base_model` and the head), so
every architecture keeps its specifics (soft-capping, sliding windows, rope variants, scaled
embeddings, fused projections), but it pays none of `generate`'s per-token bookkeeping:

* keys and values go into buffers of fixed shape (B, KVH, prompt + budget, D), written in
  place (`DecodeCache`), instead of a cache that grows by concatenation;
* the attention masks are built here from a (B, S) record of the slots holding real tokens,
  one (B, 1, T, S) additive mask per attention type, so transformers' mask construction never
  runs;
* on CPU in float32, attention runs transformers' eager code (eager_attention);
* float32 LoRA adapters run folded into copies of their base weights, one projection each
  (lora.merged_for_inference);
* tokens are drawn on the device with the seeded generator by inverse transform sampling, one
  uniform number per original row and step (N, not N x V: for a 50k vocabulary the (N, V)
  exponential noise `torch.multinomial` draws took a fifth of a decode step), so the random
  stream does not depend on how the batch is laid out;
* the host reads the finished flags only every `sync_every` tokens; rows that finished are
  then retired (the batch compacts) once they are at least a quarter of it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from mlxpost.backend import Samples, SamplingConfig
from mlxpost.backend_shared.sampling import assemble, left_pad, new_token_budget
from torch_backend import decode_gpt2, lora
from torch_backend.modeling import TORCH_DTYPES, TorchModel, lm_logits, positions, soft_cap

SYNC_EVERY = 8  # tokens between host reads of the finished flags
RETIRE_SHARE = 0.25  # compact the batch once this share of its rows has finished
HEAD_CHUNK = 2048  # vocabulary rows per block of the head matmul on CPU


def cache_keyword(module: torch.nn.Module) -> str:
    """The name under which forward takes and returns the KV cache.

    transformers 5.24 renamed `past_key_values` to `cache` (the old name warns and
    goes in 5.40); earlier releases know only `past_key_values`.
    """
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def filter_logits(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus."""
    if top_k > 0 and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p; the first always stays.
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def choose(logits: torch.Tensor, cfg: SamplingConfig, uniform: torch.Tensor | None):
    """Next tokens (N,) and their behaviour logprobs under log_softmax(logits / T).

    uniform: (N,) draws from [0, 1), one per row. A row's token is where its draw falls in the
    cumulative distribution of its (filtered) probabilities (inverse transform sampling), so it
    depends only on that row's draw, and a step costs N random numbers, not N x V."""
    logits = logits.float()
    if cfg.temperature == 0:
        token = torch.argmax(logits, dim=-1)
        logp = torch.log_softmax(logits, dim=-1)
    else:
        scaled = logits / cfg.temperature if cfg.temperature != 1 else logits
        logp = torch.log_softmax(scaled, dim=-1)
        if cfg.top_k > 0 or cfg.top_p < 1.0:
            probs = torch.softmax(filter_logits(scaled, cfg.top_k, cfg.top_p), dim=-1)
        else:
            probs = logp.exp()
        token = inverse_cdf(probs, uniform)
    return token, logp.gather(-1, token[:, None])[:, 0]


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The first token whose cumulative probability exceeds uniform x the row's total. The
    draw is scaled by the computed total, so rounding in the sum never leaves it past the end,
    and a token of probability 0 adds nothing to the sum, so it is never the first to pass."""
    cdf = torch.cumsum(probs, dim=-1)
    target = uniform[:, None] * cdf[:, -1:]
    token = torch.searchsorted(cdf, target, right=True)[:, 0]
    return token.clamp_(max=probs.shape[-1] - 1)


class DecodeCache:
    """Per-layer key/value buffers (B, KVH, S, D) allocated once for prompt + budget, written
    in place.

    It stands in for transformers' Cache in the attention modules' `update(key, value,
    layer_idx)`: the T new entries go to slots [first, first + T) (set before each forward
    call) and the filled prefix comes back, so attention reads only the slots written so far.
    Buffers are allocated on the first write, from the shapes the model's own layers produce.
    """

    def __init__(self, length: int, keyword: str):
        self.length = length
        self.keyword = keyword  # the name forward takes it under (cache_keyword)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.first = 0  # slot of the first new token of the current forward call
        self.written = 0  # slots filled before it

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx not in self.keys:
            batch, heads, _, dim = key.shape
            shape = (batch, heads, self.length, dim)
            self.keys[layer_idx] = key.new_zeros(shape)
            self.values[layer_idx] = value.new_zeros(shape)
        end = self.first + key.shape[2]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[:, :, self.first : end] = key
        values[:, :, self.first : end] = value
        return keys[:, :, :end], values[:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.written

    def rows(self, index: torch.Tensor) -> None:
        """Keep only the rows `index` (in that order): repeats for samples, retirements."""
        for buffers in (self.keys, self.values):
            for layer, buffer in buffers.items():
                buffers[layer] = buffer.index_select(0, index)


class DecodeMasks:
    """Additive attention masks (B, 1, T, S) over the cache's slots, in the model dtype, one per
    attention type the model's layers use (a dict where the config names layer types, else one
    mask, windowed where the config has a window, as model_mask gives transformers).

    A query at slot q sees a key at slot k iff k <= q, k holds a real token, and on sliding
    layers q - k < window: transformers' rule on cache positions, left padding included (a
    padding query sees the real keys before it, so no row of the softmax is empty but the
    leading padding's, which gets a uniform row, as transformers' does)."""

    def __init__(self, model: TorchModel, prompt_mask: torch.Tensor, length: int):
        config = model.module.config
        self.dtype = TORCH_DTYPES[model.dtype]
        self.window = getattr(config, "sliding_window", None)
        self.types = sorted(set(getattr(config, "layer_types", None) or ())) or None
        unknown = set(self.types or ()) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"sampling does not support layers of type {sorted(unknown)}")
        batch, width = prompt_mask.shape
        device = prompt_mask.device
        self.real = torch.zeros((batch, length), dtype=torch.bool, device=device)
        self.real[:, :width] = prompt_mask > 0
        self.index = torch.arange(length, device=device)
        self.zero = torch.zeros((), dtype=self.dtype, device=device)
        self.blocked = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype, device=device)

    def build(self, first: int, count: int):
        """The mask(s) for queries in slots [first, first + count) over keys in slots
        [0, first + count)."""
        end = first + count
        distance = self.index[first:end, None] - self.index[None, :end]  # (T, S)
        visible = (distance >= 0)[None] & self.real[:, None, :end]  # (B, T, S)

        def additive(window: int | None) -> torch.Tensor:
            allowed = visible if window is None else visible & (distance < window)[None]
            return torch.where(allowed, self.zero, self.blocked)[:, None]  # (B, 1, T, S)

        if self.types is None:
            return additive(self.window)
        return {
            kind: additive(self.window if kind == "sliding_attention" else None)
            for kind in self.types
        }

    def mark_real(self, slot: int) -> None:
        self.real[:, slot] = True

    def rows(self, index: torch.Tensor) -> None:
        self.real = self.real.index_select(0, index)


@contextlib.contextmanager
def eager_attention(model: TorchModel) -> Iterator[None]:
    """transformers' eager attention while sampling. Its matmuls give sdpa's numbers to float32
    rounding (modeling.ATTENTION), and for one query over a cache of a few hundred slots they
    took half the time of torch's fused CPU kernel (measured on a 2-core machine), which was a
    third of a decode step of the bundled model there."""
    module = model.module
    previous = module.config._attn_implementation
    # In half precision the two round differently: the sampler keeps the trainer's kernel.
    if previous == "eager" or module.device.type != "cpu" or model.dtype != "float32":
        yield
        return
    module.set_attn_implementation("eager")
    try:
        yield
    finally:
        module.set_attn_implementation(previous)


def head_logits(model: TorchModel, hidden: torch.Tensor, chunk: int) -> torch.Tensor:
    """lm_logits of (N, H) hidden states, the head's vocabulary rows taken `chunk` at a time on
    CPU, as a plain nn.Linear head allows: each output element is the same dot product, but a
    block of the weight stays in cache while all N rows use it (a 64-row decode step of a
    50k x 768 head took 55-60 ms in one matmul and about 36 ms in blocks of 2048, measured on a
    2-core machine)."""
    head = model.module.lm_head
    vocab = head.weight.shape[0] if isinstance(head, torch.nn.Linear) else 0
    if chunk <= 0 or vocab <= chunk or hidden.device.type != "cpu":
        return lm_logits(model, hidden)
    out = hidden.new_empty((hidden.shape[0], vocab))
    for first in range(0, vocab, chunk):
        rows = slice(first, first + chunk)
        bias = None if head.bias is None else head.bias[rows]
        out[:, rows] = torch.nn.functional.linear(hidden, head.weight[rows], bias)
    return soft_cap(model, out)


class Forward:
    """Final hidden states (B, T, H) of new tokens at slots [first, first + T), their keys and
    values written into the cache, through the model's own modules: GPT-2's written-out step
    where it applies (decode_gpt2, multiplying with its projections' (out, in) copies, made
    once per sampling call), else transformers' base model."""

    def __init__(self, model: TorchModel):
        self.model = model
        self.gpt2 = decode_gpt2.applies(model)
        self.weights = decode_gpt2.linear_weights(model) if self.gpt2 else None

    def __call__(self, ids, masks, position_ids, cache: DecodeCache, first: int):
        cache.first = first
        if self.gpt2:  # the same operations without transformers' Python
            hidden = decode_gpt2.hidden(self.model, ids, masks, position_ids, cache, self.weights)
        else:
            hidden = self.model.module.base_model(
                input_ids=ids,
                attention_mask=masks,
                position_ids=position_ids,
                use_cache=True,
                **{cache.keyword: cache},
            ).last_hidden_state
        cache.written = first + ids.shape[1]
        return hidden


def sample(
    model: TorchModel,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    eos_ids: Sequence[int],
    pad_id: int,
    seed: int,
    device: torch.device,
    on_token: Callable[[np.ndarray], None] | None = None,
    sync_every: int = SYNC_EVERY,
) -> Samples:
    """Sample cfg.n completions per prompt. `on_token`, when given, is called after every
    step with that step's (N,) int32 token row (pad_id in rows already finished), so a
    caller can stream the tokens; it changes nothing sampled. `sync_every` (tokens between
    checks for EOS) changes only the speed, never the samples."""
    merged = lora.merged_for_inference(model.lora.values())
    with torch.no_grad(), eager_attention(model), merged:
        return decode(model, prompts, cfg, eos_ids, pad_id, seed, device, on_token, sync_every)


def decode(model, prompts, cfg, eos_ids, pad_id, seed, device, on_token, sync_every) -> Samples:
    """sample()'s loop, run under no_grad with the sampling attention."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    width = prompt_ids.shape[1]
    budget = new_token_budget(model.config, width, cfg.max_new_tokens)
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    mask = torch.as_tensor(prompt_mask, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    eos = torch.as_tensor(list(eos_ids), device=device)

    cache = DecodeCache(width + budget, cache_keyword(model.module.base_model))
    masks = DecodeMasks(model, mask, width + budget)
    forward = Forward(model)
    hidden = forward(ids, masks.build(0, width), positions(mask), cache, 0)
    logits = head_logits(model, hidden[:, -1], HEAD_CHUNK)  # (B, V): never (B, P, V)
    position = positions(mask)[:, -1] + 1  # (B,)
    if cfg.n > 1:  # every sample of a prompt reuses that prompt's prefill
        repeat = torch.arange(ids.shape[0], device=device).repeat_interleave(cfg.n)
        cache.rows(repeat)
        masks.rows(repeat)
        logits, position = logits[repeat], position[repeat]

    total = logits.shape[0]
    rows = torch.arange(total, device=device)  # the original row of each batch row
    done = torch.zeros(total, dtype=torch.bool, device=device)
    tokens = torch.full((total, budget), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((total, budget), dtype=torch.float32, device=device)
    live = torch.zeros((total, budget), dtype=torch.bool, device=device)
    uniform = None
    for step in range(budget):
        if cfg.temperature > 0:  # a draw for every original row: retiring rows keeps the stream
            uniform = torch.rand((total,), generator=generator, device=device)
            if rows.shape[0] < total:
                uniform = uniform[rows]
        token, logp = choose(logits, cfg, uniform)
        token = torch.where(done, pad_id, token)
        tokens[rows, step] = token
        logprobs[rows, step] = logp
        live[rows, step] = ~done
        done = done | torch.isin(token, eos)
        if on_token is not None:  # a device-to-host copy per step, only when streaming
            on_token(tokens[:, step].cpu().numpy().astype(np.int32))
        if step == budget - 1:
            break
        if (step + 1) % sync_every == 0 or on_token is not None:
            finished = int(done.sum())
            if finished == done.shape[0]:
                break
            if finished >= RETIRE_SHARE * done.shape[0]:
                keep = torch.nonzero(~done)[:, 0]
                cache.rows(keep)
                masks.rows(keep)
                rows, done, token, position = rows[keep], done[keep], token[keep], position[keep]
        slot = width + step
        masks.mark_real(slot)
        hidden = forward(token[:, None], masks.build(slot, 1), position[:, None], cache, slot)
        logits = head_logits(model, hidden[:, -1], HEAD_CHUNK)
        position = position + 1

    live = live.cpu().numpy()
    steps = int(np.flatnonzero(live.any(axis=0)).max()) + 1  # up to the last EOS, as generated
    return assemble(
        prompt_ids,
        prompt_mask,
        tokens[:, :steps].cpu().numpy(),
        logprobs[:, :steps].cpu().numpy(),
        live[:, :steps],
        cfg.n,
        eos_ids,
        pad_id,
    )
