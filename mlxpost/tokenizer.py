"""Loading a checkpoint's tokenizer and the token ids generation needs."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from mlxpost.errors import UserError


@dataclass
class TokenizerInfo:
    tokenizer: object
    pad_id: int
    eos_ids: list[int]


def load_tokenizer(path: str) -> TokenizerInfo:
    """AutoTokenizer from a local directory, with a pad id (falls back to EOS) and every EOS id
    (the tokenizer's and generation_config.json's)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # config warnings are not the user's concern here
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: no usable tokenizer ({err})") from err
    eos_ids = []
    if tokenizer.eos_token_id is not None:
        eos_ids.append(int(tokenizer.eos_token_id))
    generation_config = os.path.join(path, "generation_config.json")
    if os.path.isfile(generation_config):
        with open(generation_config) as f:
            extra = json.load(f).get("eos_token_id")
        for token in extra if isinstance(extra, list) else [extra]:
            if token is not None and int(token) not in eos_ids:
                eos_ids.append(int(token))
    if not eos_ids:
        raise UserError(f"{path}: the tokenizer defines no EOS token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    return TokenizerInfo(tokenizer=tokenizer, pad_id=int(pad_id), eos_ids=eos_ids)
