"""Hugging Face Hub ids as model options: `--model Qwen/Qwen3-0.6B` names a local snapshot.

`locate_model` turns a hub id into the directory of its snapshot in the local
Hugging Face cache (HF_HOME / HF_HUB_CACHE), downloading it first when it is
not there and downloads are allowed (HF_HUB_OFFLINE unset). Only what mlxpost
reads is fetched: safetensors weights, JSON configs and tokenizer files; never
pickled weights (*.bin, *.pt) or remote code. Anything that is not a hub id,
and any path that exists, is returned unchanged, so the later checks of
mlxpost.model_dir report a missing or broken local directory as before.

A cached snapshot is used as it is, without asking the Hub for a newer
revision: the same id gives the same directory on every run (so `--resume`
sees the same model) and no network is needed once a model is cached.
"""

from __future__ import annotations

import glob
import os

import click

from mlxpost.errors import UserError, first_line
from mlxpost.model_dir import HUB_ID

# Files of a repository that are downloaded: the weights, every JSON file (config, index,
# tokenizer config, generation config), sentencepiece and BPE vocabularies, chat templates.
ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "*.jinja",
]
# Folders (the original framework's files, ONNX exports...) and the consolidated weights of
# Mistral-format repositories are not part of a transformers checkpoint.
IGNORE_PATTERNS = ["*/*", "consolidated*.safetensors"]


def is_hub_id(name_or_path: str) -> bool:
    """`org/name` that is not an existing path: an existing relative path wins."""
    return not os.path.exists(name_or_path) and bool(HUB_ID.match(name_or_path))


def locate_model(name_or_path: str, option: str = "--model") -> str:
    """A local checkpoint directory for a model option's value: the value itself, or, for a
    hub id, its snapshot in the Hugging Face cache (downloaded if missing and allowed).
    UserError, naming `option` and the id, when a hub id cannot be made available."""
    if not name_or_path or not is_hub_id(name_or_path):
        return name_or_path
    from huggingface_hub import constants

    name, cache = name_or_path, constants.HF_HUB_CACHE
    where = f"{option} {name}"
    how = (
        f"run `hf download {name}` on a machine with network (HF_HUB_CACHE pointing at this "
        "cache), or pass a local checkpoint directory"
    )
    cached, problem = cached_snapshot(name, where)
    if cached is not None and not snapshot_problem(cached):
        return cached
    if offline():
        if cached is not None:
            raise UserError(f"{where}: the cached snapshot {cached} {snapshot_problem(cached)}")
        raise UserError(
            f"{where}: not found (no such directory, nor in the local Hugging Face cache "
            f"{cache}; downloads are off: HF_HUB_OFFLINE). {problem}To get it, {how}"
        )
    path = download(name, where, cache, how)
    missing = snapshot_problem(path)
    if missing:
        raise UserError(f"{where}: the downloaded snapshot {path} {missing}")
    return path


def offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else constants.HF_HUB_OFFLINE)


def cached_snapshot(name: str, where: str) -> tuple[str | None, str]:
    """(snapshot directory, "") of the id's main revision in the cache, or (None, why not)
    where the cache has no usable copy. Reads the cache only, never the network."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            name,
            local_files_only=True,
            allow_patterns=ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
        )
    except ValueError as err:  # huggingface_hub's check of the id's spelling
        raise UserError(f"{where}: not a valid Hugging Face Hub id ({first_line(err)})") from None
    except OSError as err:
        incomplete = getattr(err, "snapshot_path", None)
        if incomplete:
            return None, f"Its cached snapshot {incomplete} is incomplete. "
        return None, ""
    return str(path), ""


def download(name: str, where: str, cache: str, how: str) -> str:
    """Fetch the id's main revision into the cache with huggingface_hub, whose progress bars
    go to stderr; the snapshot directory."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        path = snapshot_download(
            name, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS
        )
    except GatedRepoError:
        raise UserError(
            f"{where}: a gated model; accept its terms on https://huggingface.co/{name} and log "
            "in (`hf auth login` or HF_TOKEN), or pass a local checkpoint directory"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{where}: not found (no such directory, nor a model on the Hugging Face Hub; a "
            "private one needs `hf auth login` or HF_TOKEN)"
        ) from None
    except (OSError, ValueError) as err:
        cause = err.__cause__ or err  # huggingface_hub wraps the connection error
        raise UserError(
            f"{where}: not found (no such directory, nor in the local Hugging Face cache "
            f"{cache}, and the download failed: {type(cause).__name__}: {first_line(cause)}). "
            f"To get it, {how}"
        ) from None
    # Said once it worked, so that a failure stays the only line on stderr.
    click.echo(f"{where}: downloaded into {path}", err=True)
    return str(path)


def snapshot_problem(path: str) -> str:
    """What keeps a snapshot directory from being a checkpoint mlxpost reads ("": nothing)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        return "has no config.json (not a transformers checkpoint, or an incomplete download)"
    if not glob.glob(os.path.join(glob.escape(path), "*.safetensors")):
        return "has no *.safetensors weights (mlxpost reads safetensors only, never *.bin or *.pt)"
    return ""
