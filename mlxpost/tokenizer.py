"""Loading a checkpoint's tokenizer and the token ids generation needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

from mlxpost.errors import UserError, first_line
from mlxpost.model_dir import VOCABULARY_FILES, check_tokenizer_files, read_json


@dataclass
class TokenizerInfo:
    tokenizer: object
    pad_id: int
    eos_ids: list[int]


def load_tokenizer(path: str) -> TokenizerInfo:
    """AutoTokenizer from a local directory, with a pad id (falls back to EOS) and every EOS id
    (the tokenizer's and generation_config.json's)."""
    if not os.path.isdir(path):  # AutoTokenizer would take it for a Hub name and go online
        raise UserError(f"{path}: model directory not found")
    check_tokenizer_files(path)
    if not any(os.path.isfile(os.path.join(path, name)) for name in VOCABULARY_FILES):
        raise UserError(f"{path}: no tokenizer ({' or '.join(VOCABULARY_FILES)}) found")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # config warnings are not the user's concern here
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # transformers raises many types, all meaning "unusable"
        raise UserError(f"{path}: no usable tokenizer ({first_line(err)})") from None
    eos_ids = []
    if tokenizer.eos_token_id is not None:
        eos_ids.append(int(tokenizer.eos_token_id))
    generation_config = os.path.join(path, "generation_config.json")
    if os.path.isfile(generation_config):
        extra = read_json(generation_config)
        extra = extra.get("eos_token_id") if isinstance(extra, dict) else None
        for token in extra if isinstance(extra, list) else [extra]:
            if token is None:
                continue
            if isinstance(token, bool) or not isinstance(token, int):
                raise UserError(
                    f"{generation_config}: eos_token_id must be a token id or a list of them, "
                    f"got {token!r}"
                )
            if token not in eos_ids:
                eos_ids.append(token)
    if not eos_ids:
        raise UserError(f"{path}: the tokenizer defines no EOS token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    return TokenizerInfo(tokenizer=tokenizer, pad_id=int(pad_id), eos_ids=eos_ids)
