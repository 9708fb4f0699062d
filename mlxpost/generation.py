"""Prompt encoding and batched generation on any backend, with a progress bar."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from mlxpost.backend import Backend, Samples, SamplingConfig
from mlxpost.tokenizer import TokenizerInfo


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation ending in the assistant's generation prompt, exactly as the
    data pipeline encodes prompts (chat template, or the plain fallback with the tokenizer's
    BOS where it adds one)."""
    from mlxpost.data.tokenize import ChatEncoder

    with warnings.catch_warnings():  # the data pipeline warns once about a missing template
        warnings.simplefilter("ignore", UserWarning)
        return ChatEncoder(tokenizer).prompt_ids(messages)


@dataclass
class Generations:
    samples: list[Samples]  # one per batch, in the order the prompts were given per batch
    order: np.ndarray  # prompt indices in batch order
    texts: list[str]  # decoded completions, aligned with the caller's prompts (n per prompt)
    lengths: np.ndarray  # completion tokens per text
    finished: np.ndarray  # stopped at EOS (not truncated)


def generate(
    backend: Backend,
    model,
    info: TokenizerInfo,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    batch_size: int = 64,
    seed: int = 0,
    desc: str = "generating",
) -> Generations:
    """Sample cfg.n completions per prompt; prompts are batched by length to limit padding."""
    order = np.argsort([len(p) for p in prompts], kind="stable")
    count = len(prompts) * cfg.n
    texts: list[str] = [""] * count
    lengths = np.zeros(count, np.int32)
    finished = np.zeros(count, bool)
    all_samples = []
    with tqdm(total=len(prompts), desc=desc, unit="prompt", file=sys.stderr, leave=False) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = order[start : start + batch_size]
            samples = backend.sample(
                model, [prompts[i] for i in chunk], cfg, info.eos_ids, info.pad_id, seed + start
            )
            all_samples.append(samples)
            for row in range(samples.completion_ids.shape[0]):
                target = chunk[samples.prompt_index[row]] * cfg.n + row % cfg.n
                live = samples.completion_mask[row] == 1
                tokens = samples.completion_ids[row][live].tolist()
                texts[target] = info.tokenizer.decode(tokens, skip_special_tokens=True)
                lengths[target] = len(tokens)
                finished[target] = samples.finished[row]
            bar.update(len(chunk))
    return Generations(all_samples, order, texts, lengths, finished)


def generate_replies(
    backend: Backend, model, info: TokenizerInfo, conversations, cfg, desc: str
) -> Generations:
    """One completion per conversation, with the sampling fields of an eval config
    (max_new_tokens, temperature, top_p, top_k, batch_size, seed)."""
    prompts = [encode_prompt(info.tokenizer, messages) for messages in conversations]
    sampling = SamplingConfig(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
    )
    return generate(backend, model, info, prompts, sampling, cfg.batch_size, cfg.seed, desc=desc)
