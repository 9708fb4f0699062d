"""Loading a trained reward model (`mlxpost rm`'s final/) and scoring text with it.

    model, info = load_reward_model(backend, "runs/rm-.../final")
    scores = score_texts(backend, model, info, [[{"role": "user", "content": "Hi"}]], ["Hello!"])

A text is rendered exactly as training rendered it (the base model's chat
template, prompt then completion) and scored by the scalar head at its last
token. Used by `mlxpost eval --task reward`, DPO's --eval-reward-model and RL
rewards (RewardModelScorer).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlxpost.errors import UserError
from mlxpost.tokenizer import TokenizerInfo

REWARD_MODEL_FILE = "reward_model.json"
TRAINABLE_FILE = "trainable.npz"


@dataclass
class RewardModelInfo:
    directory: str
    base_model: str
    lora: bool
    max_length: int | None
    tokenizer: TokenizerInfo


def read_reward_model_info(directory: str) -> dict:
    """reward_model.json of a reward-model directory; UserError when it is not one."""
    path = os.path.join(directory, REWARD_MODEL_FILE)
    if not os.path.isfile(path):
        raise UserError(
            f"{directory}: not a reward model (no {REWARD_MODEL_FILE}; "
            "give the final/ directory of an `mlxpost rm` run)"
        )
    try:
        with open(path) as f:
            info = json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(info, dict) or info.get("kind") != "reward_model" or "base_model" not in info:
        raise UserError(f"{path}: not a reward model description")
    if not os.path.isfile(os.path.join(directory, TRAINABLE_FILE)):
        raise UserError(f"{directory}: {TRAINABLE_FILE} (the trained weights) is missing")
    return info


def load_reward_model(
    backend, directory: str, dtype: str = "float32"
) -> tuple[Any, RewardModelInfo]:
    """(model, info): the base model of reward_model.json with the scalar head, the LoRA
    adapter when it was trained with one, and every trained weight of trainable.npz."""
    from mlxpost.model_dir import read_config
    from mlxpost.run import load_arrays
    from mlxpost.tokenizer import load_tokenizer

    info = read_reward_model_info(directory)
    base = info["base_model"]
    read_config(base)  # a moved or deleted base model fails here, with its path
    model = backend.load_model(base, dtype)
    backend.attach_scalar_head(model)
    if info.get("lora"):
        backend.load_adapter(model, directory)  # attaches LoRA with the adapter's own config
    backend.set_parameters(model, load_arrays(os.path.join(directory, TRAINABLE_FILE)))
    return model, RewardModelInfo(
        directory=directory,
        base_model=base,
        lora=bool(info.get("lora")),
        max_length=info.get("max_length"),
        tokenizer=load_tokenizer(base),
    )


def encode_scored(tokenizer, prompt_messages: list[dict], completion, max_length: int | None):
    """Token ids of prompt + completion as training encoded them (ChatEncoder.split);
    longer than max_length: the first max_length tokens, as training truncates."""
    import warnings

    from mlxpost.data import ChatEncoder

    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no chat template: the plain fallback is intended
        prompt, tail = ChatEncoder(tokenizer).split(prompt_messages, completion)
    ids = prompt + tail
    return ids[:max_length] if max_length else ids


def score_texts(
    backend,
    model,
    info: RewardModelInfo,
    prompts_messages: list[list[dict]],
    completions: list,
    batch_size: int = 16,
) -> np.ndarray:
    """(N,) float32 rewards of completions (strings or assistant message lists) to prompts."""
    from mlxpost.data import pad_batch
    from mlxpost.functional import last_token_index

    if len(prompts_messages) != len(completions):
        raise ValueError(f"{len(prompts_messages)} prompts for {len(completions)} completions")
    encoded = [
        encode_scored(info.tokenizer.tokenizer, prompt, completion, info.max_length)
        for prompt, completion in zip(prompts_messages, completions)
    ]
    scores = np.zeros(len(encoded), np.float32)
    order = np.argsort([len(ids) for ids in encoded], kind="stable")  # little padding
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = pad_batch([encoded[i] for i in chunk], info.tokenizer.pad_id)
        values = backend.scores(model, ids, mask)  # (B, T)
        last = last_token_index(mask)
        scores[chunk] = values[np.arange(len(chunk)), last]
    return scores


class RewardModelScorer:
    """A reward model as a batched reward: scorer(prompts_messages, completions) -> (N,)."""

    def __init__(self, backend, directory: str, dtype: str = "float32", batch_size: int = 16):
        self.backend = backend
        self.model, self.info = load_reward_model(backend, directory, dtype)
        self.batch_size = batch_size

    def __call__(self, prompts_messages: list[list[dict]], completions: list) -> np.ndarray:
        return score_texts(
            self.backend, self.model, self.info, prompts_messages, completions, self.batch_size
        )
