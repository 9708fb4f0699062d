"""The numpy parts of both backends' sampling (`mlx_backend/sampling.py`,
`torch_backend/sampling.py`): prompt left-padding, the new-token budget, and assembling the
per-step outputs into `Samples`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mlxpost.backend import Samples


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, P) ids and mask, prompts right-aligned so generation continues every row at once."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(prompts), width), dtype=np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def new_token_budget(config: dict, prompt_width: int, requested: int) -> int:
    """max_new_tokens, cut so prompt + completion stays within the model's positions."""
    from mlxpost.model_dir import max_positions

    limit = max_positions(config)
    if limit is None:
        return requested
    if prompt_width >= limit:
        raise ValueError(
            f"a prompt of {prompt_width} tokens leaves no room in the model's {limit} positions"
        )
    return min(requested, limit - prompt_width)


def assemble(
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    tokens: np.ndarray,
    logprobs: np.ndarray,
    live: np.ndarray,
    n: int,
    eos_ids: Sequence[int],
    pad_id: int,
) -> Samples:
    """Build Samples from (N, C) step outputs; `live[:, t]` says the row was still generating."""
    completion_mask = live.astype(np.int32)
    completion_ids = np.where(completion_mask == 1, tokens, pad_id).astype(np.int32)
    completion_logprobs = np.where(completion_mask == 1, logprobs, 0.0).astype(np.float32)
    finished = np.any(np.isin(completion_ids, list(eos_ids)) & (completion_mask == 1), axis=1)
    return Samples(
        prompt_ids=np.repeat(prompt_ids, n, axis=0),
        prompt_mask=np.repeat(prompt_mask, n, axis=0),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        logprobs=completion_logprobs,
        finished=finished,
        prompt_index=np.repeat(np.arange(prompt_ids.shape[0]), n),
    )
