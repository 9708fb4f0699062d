"""Reading a dataset into a list of row dicts, with errors that name the file and line.

JSON and JSON Lines are parsed here rather than by `datasets`: Arrow infers one
type per column, so a malformed line or a row of the wrong type would surface
as an Arrow error far from its cause. Parquet is read with pyarrow and CSV with
pandas, as `datasets` reads them but without its cache files and log lines;
`save_to_disk` directories and cached Hub datasets go through `datasets`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

from mlxpost.errors import UserError, first_line

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
# "org/name" with no file extension: a Hugging Face Hub dataset, looked up in the local
# Hugging Face cache when no local path of that name exists.
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_records(path, split: str | None = None) -> list[dict]:
    """Every row of a local file, a `save_to_disk` directory or a Hub dataset, as dicts.

    `split` picks a split of a DatasetDict directory or of a Hub dataset
    (default: "train", or the only split there is).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        records = _load_from_disk(path, split)
    elif os.path.isfile(path):
        records = _load_file(path)
    elif _looks_like_hub_name(path):
        records = _load_from_hub(path, split)
    else:
        raise UserError(f"{path}: not found")
    if not records:
        raise UserError(f"{path}: no examples")
    return records


def _looks_like_hub_name(path: str) -> bool:
    return bool(HUB_NAME.match(path)) and not path.lower().endswith(SUPPORTED_EXTENSIONS)


def _load_file(path: str) -> list[dict]:
    extension = os.path.splitext(path)[1].lower()
    if extension not in SUPPORTED_EXTENSIONS:
        raise UserError(
            f"{path}: unsupported file type {extension or '(no extension)'!r}; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)} files or a datasets save_to_disk directory"
        )
    if extension == ".parquet":
        return _load_parquet(path)
    text = read_text(path)
    if extension == ".csv":
        if not text.strip():
            return []
        return _load_csv(path)
    if extension == ".json":
        return _parse_json(path, text)
    return parse_jsonl(path, text)


def read_text(path: str) -> str:
    """The file decoded as UTF-8 (a leading byte-order mark is dropped)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None
    return text.removeprefix("\ufeff")


def parse_jsonl(path: str, text: str) -> list[dict]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (often a trailing one) carry no row
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{path}:{number}: not valid JSON ({err.msg}: column {err.colno})"
            ) from None
        if not isinstance(value, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {json_kind(value)}")
        records.append(value)
    return records


def _parse_json(path: str, text: str) -> list[dict]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        # Many datasets ship JSON Lines under a .json name; `datasets` accepts both.
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return parse_jsonl(path, text)
        if not text.strip():
            return []
        raise UserError(
            f"{path}:{err.lineno}: not valid JSON ({err.msg}: column {err.colno})"
        ) from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise UserError(
            f'{path}: expected a JSON list of objects or {{"data": [...]}}, got {json_kind(value)}'
        )
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise UserError(f"{path}: item {index} is {json_kind(item)}, not a JSON object")
    return value


def json_kind(value) -> str:
    """How a JSON value reads to a user: 'a string', 'a list', 'null'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _load_parquet(path: str) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # Arrow raises several types; all mean "unreadable"
        reason = re.sub(r"^Could not open Parquet input source '.*?': ", "", first_line(err))
        raise UserError(f"{path}: not a readable Parquet file ({reason})") from None
    return table.to_pylist()


def _load_csv(path: str) -> list[dict]:
    """Rows as `datasets`' CSV builder reads them: pandas' parser, then Arrow (empty -> None)."""
    import pandas as pd
    import pyarrow as pa

    try:
        table = pa.Table.from_pandas(pd.read_csv(path), preserve_index=False)
    except Exception as err:  # pandas' ParserError names the row; Arrow's errors the column
        raise UserError(f"{path}: not a readable CSV file ({first_line(err)})") from None
    return table.to_pylist()


def _load_from_disk(path: str, split: str | None) -> list[dict]:
    import datasets

    datasets.disable_progress_bars()  # stderr carries mlxpost's own progress and errors

    is_dict = os.path.isfile(os.path.join(path, "dataset_dict.json"))
    if not is_dict and not os.path.isfile(os.path.join(path, "dataset_info.json")):
        raise UserError(
            f"{path}: a directory, but not one written by datasets' save_to_disk "
            "(no dataset_info.json or dataset_dict.json)"
        )
    try:
        dataset = datasets.load_from_disk(path)
    except Exception as err:
        raise UserError(
            f"{path}: cannot read this save_to_disk directory ({first_line(err)})"
        ) from None
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[_pick_split(path, list(dataset), split)]
    return dataset.to_list()


def _pick_split(path: str, splits: list[str], split: str | None) -> str:
    if split is not None:
        if split not in splits:
            raise UserError(f"{path}: no split {split!r}; splits: {', '.join(splits)}")
        return split
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise UserError(f"{path}: several splits ({', '.join(splits)}); choose one with --split")


def _load_from_hub(path: str, split: str | None) -> list[dict]:
    """A Hub dataset from the local Hugging Face cache only: a downloaded snapshot of the
    repository, or the Arrow cache an earlier `datasets.load_dataset` left. Nothing is
    downloaded, so a name in neither place fails at once."""
    snapshot, arrow_cache = _hub_snapshot(path), _arrow_cache(path)
    if snapshot is None and arrow_cache is None:
        raise UserError(
            f"{path}: not found: no such local file or directory, and no dataset of that name "
            f"in the local Hugging Face cache; pass a local file "
            f"({', '.join(SUPPORTED_EXTENSIONS)}) or a save_to_disk directory"
        )
    import datasets

    datasets.disable_progress_bars()
    try:
        if snapshot is not None:  # the repository's files, read as a local directory
            dataset = datasets.load_dataset(snapshot, split=split or "train")
        else:
            with _hub_offline():
                dataset = datasets.load_dataset(path, split=split or "train")
    except Exception as err:
        raise UserError(
            f"{path}: cannot read it from the local Hugging Face cache "
            f"({snapshot or arrow_cache}): {first_line(err)}"
        ) from None
    return dataset.to_list()


def _hub_snapshot(name: str) -> str | None:
    """The newest downloaded snapshot of Hub dataset `name` (the `main` ref if recorded)."""
    from huggingface_hub import constants

    repo = os.path.join(constants.HF_HUB_CACHE, "datasets--" + name.replace("/", "--"))
    snapshots = os.path.join(repo, "snapshots")
    if not os.path.isdir(snapshots):
        return None
    ref = os.path.join(repo, "refs", "main")
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8") as f:
            main = os.path.join(snapshots, f.read().strip())
        if os.path.isdir(main):
            return main
    found = [os.path.join(snapshots, d) for d in os.listdir(snapshots)]
    return max(found, key=os.path.getmtime) if found else None


def _arrow_cache(name: str) -> str | None:
    """`datasets`' own cache of Hub dataset `name` (org___name, the name in snake case)."""
    from huggingface_hub import constants

    root = os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets")
    org, _, dataset = name.partition("/")
    if not os.path.isdir(root):
        return None
    key = dataset.replace("_", "").lower()
    for entry in os.listdir(root):
        cached_org, _, cached = entry.partition("___")
        if cached_org == org and cached.replace("_", "").lower() == key:
            return os.path.join(root, entry)
    return None


@contextlib.contextmanager
def _hub_offline():
    """`datasets` in offline mode: it reads its cache instead of asking the Hub."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
