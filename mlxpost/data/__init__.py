"""The data pipeline: load rows, normalise them per command, tokenize, filter, batch.

    records = load_records("train.jsonl")
    fmt, examples = normalise_records(records, "sft", "train.jsonl")
    examples, reports = apply_filters(examples)
    tokenized, length_report = tokenize_examples(examples, tokenizer, TokenizeConfig(max_length=1024))
    ids, attention = pad_batch([t.input_ids for t in tokenized], pad_id)

Packing several short examples into each row (attention mask = segment ids):

    rows = pack_lengths([len(t.input_ids) for t in tokenized], 1024)
    ids, segments = pad_packed([[tokenized[i].input_ids for i in row] for row in rows], pad_id)

`datasets` and `transformers` are imported only when needed, so importing this
package stays cheap for the command line.
"""

from mlxpost.data.check import check_dataset, format_check_report
from mlxpost.data.filters import (
    apply_filters,
    deduplicate,
    filter_length,
    filter_quality,
    near_deduplicate,
)
from mlxpost.data.formats import (
    COMMANDS,
    FORMATS,
    ChatExample,
    PreferenceExample,
    PromptExample,
    UnpairedExample,
    detect_format,
    normalise_records,
)
from mlxpost.data.loading import SUPPORTED_EXTENSIONS, load_records
from mlxpost.data.tokenize import (
    PLAIN_FORMATS,
    ChatEncoder,
    TokenizeConfig,
    TokenizedExample,
    limit_lengths,
    pack_lengths,
    pad_batch,
    pad_masks,
    pad_packed,
    split_text,
    tokenize_examples,
    tokenize_preferences,
)
from mlxpost.errors import UserError


def load_examples(path, command: str, split: str | None = None):
    """(format name, normalised examples) of a dataset for `command`. A comma-separated
    list of datasets is read one by one (each in its own format) and concatenated."""
    if "," not in str(path):
        return normalise_records(load_records(path, split), command, str(path))
    formats, examples = [], []
    for part in (p.strip() for p in str(path).split(",")):
        if not part:
            raise UserError(f"{path}: empty dataset name in the comma-separated list")
        fmt, found = normalise_records(load_records(part, split), command, part)
        formats.append(fmt)
        examples.extend(found)
    return "+".join(formats), examples


__all__ = [
    "COMMANDS",
    "FORMATS",
    "PLAIN_FORMATS",
    "SUPPORTED_EXTENSIONS",
    "ChatEncoder",
    "ChatExample",
    "PreferenceExample",
    "PromptExample",
    "TokenizeConfig",
    "TokenizedExample",
    "UnpairedExample",
    "apply_filters",
    "check_dataset",
    "deduplicate",
    "detect_format",
    "filter_length",
    "filter_quality",
    "format_check_report",
    "limit_lengths",
    "load_examples",
    "load_records",
    "near_deduplicate",
    "normalise_records",
    "pack_lengths",
    "pad_batch",
    "pad_masks",
    "pad_packed",
    "split_text",
    "tokenize_examples",
    "tokenize_preferences",
]
