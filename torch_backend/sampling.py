"""Batched sampling with a KV cache, mirroring mlxpost/mlx_backend/sampling.py."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import numpy as np
import torch

from mlxpost.backend import Samples, SamplingConfig
from mlxpost.backend_shared.sampling import assemble, left_pad, new_token_budget
from torch_backend.modeling import TorchModel, positions


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


def choose(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator):
    """Next tokens (N,) and their behaviour logprobs under log_softmax(logits / T)."""
    logits = logits.float()
    if cfg.temperature == 0:
        token = torch.argmax(logits, dim=-1)
        logp = torch.log_softmax(logits, dim=-1)
    else:
        scaled = logits / cfg.temperature
        logp = torch.log_softmax(scaled, dim=-1)
        probs = torch.softmax(filter_logits(scaled, cfg.top_k, cfg.top_p), dim=-1)
        token = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return token, logp.gather(-1, token[:, None])[:, 0]


@torch.no_grad()
def sample(
    model: TorchModel,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    eos_ids: Sequence[int],
    pad_id: int,
    seed: int,
    device: torch.device,
    on_token: Callable[[np.ndarray], None] | None = None,
) -> Samples:
    """Sample cfg.n completions per prompt. `on_token`, when given, is called after every
    step with that step's (N,) int32 token row (pad_id in rows already finished), so a
    caller can stream the tokens; it changes nothing sampled."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    budget = new_token_budget(model.config, prompt_ids.shape[1], cfg.max_new_tokens)
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    mask = torch.as_tensor(prompt_mask, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    eos = torch.as_tensor(list(eos_ids), device=device)

    cache_name = cache_keyword(model.module)
    out = model.module(  # logits of the last position only: never (B, P, V) for the prompt
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions(mask),
        use_cache=True,
        logits_to_keep=1,
    )
    cache, logits = out[cache_name], out.logits[:, -1]  # (B, V)
    next_position = positions(mask)[:, -1] + 1  # (B,)
    if cfg.n > 1:  # every sample of a prompt reuses that prompt's prefill
        cache.batch_repeat_interleave(cfg.n)
        logits = logits.repeat_interleave(cfg.n, dim=0)
        mask = mask.repeat_interleave(cfg.n, dim=0)
        next_position = next_position.repeat_interleave(cfg.n, dim=0)

    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
    tokens, logprobs, live = [], [], []
    for step in range(budget):
        token, logp = choose(logits, cfg, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        logprobs.append(logp)
        live.append(~done)
        done = done | torch.isin(token, eos)
        if on_token is not None:  # a device-to-host copy per step, only when streaming
            on_token(token.cpu().numpy().astype(np.int32))
        if bool(done.all()) or step == budget - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model.module(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=next_position[:, None],
            use_cache=True,
            **{cache_name: cache},
        )
        cache, logits = out[cache_name], out.logits[:, -1]
        next_position = next_position + 1

    def stacked(steps):  # one device-to-host copy at the end, not one per token
        return torch.stack(steps, dim=1).cpu().numpy()

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
