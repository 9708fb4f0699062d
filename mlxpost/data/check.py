"""`mlxpost data check`: can a command use this dataset, and what does it look like?"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from mlxpost.data.filters import apply_filters, example_text
from mlxpost.data.formats import FORMATS, columns_of, describe_format, normalise_records
from mlxpost.data.loading import load_records
from mlxpost.data.tokenize import (
    TokenizeConfig,
    limit_lengths,
    tokenize_examples,
    tokenize_preferences,
)
from mlxpost.errors import UserError


def length_stats(lengths) -> dict:
    values = np.asarray(lengths, dtype=np.float64)
    if not values.size:
        return {}
    return {
        "min": int(values.min()),
        "mean": round(float(values.mean()), 1),
        "p50": int(np.percentile(values, 50)),
        "p95": int(np.percentile(values, 95)),
        "max": int(values.max()),
    }


def token_lengths(examples, tokenizer, max_length: int | None):
    """(lengths of every tokenized sequence, length report); pairs count both sides."""
    if examples and hasattr(examples[0], "chosen_messages"):
        encoded, _ = tokenize_preferences(examples, tokenizer)
        lengths = [len(side.input_ids) for pair in encoded for side in pair]
    else:
        encoded, _ = tokenize_examples(examples, tokenizer)
        lengths = [len(example.input_ids) for example in encoded]
    _, length_report = limit_lengths(encoded, TokenizeConfig(max_length=max_length))
    return lengths, length_report


def check_dataset(
    path, command: str, tokenizer=None, split: str | None = None, max_length: int | None = None
) -> dict:
    """A report on `path` for `command`: rows, columns, format, whether it is usable (and
    the reason if not), a normalised sample, lengths, and what the default filters drop.

    Files that cannot be read at all raise UserError; a readable file the command
    cannot use gives usable False and the reason.
    """
    path = str(path)
    records = load_records(path, split)
    report = {
        "path": path,
        "command": command,
        "rows": len(records),
        "columns": columns_of(records),
        "accepted_formats": [describe_format(needed) for _, needed in FORMATS.get(command, ())],
        "format": None,
        "usable": False,
        "reason": None,
    }
    try:
        name, examples = normalise_records(records, command, path)
        report["format"] = name
        report["examples"] = len(examples)
        report["sample"] = asdict(examples[0])
        report["lengths"] = {"chars": length_stats([len(example_text(e)) for e in examples])}
        if tokenizer is not None:
            lengths, length_report = token_lengths(examples, tokenizer, max_length)
            report["lengths"]["tokens"] = length_stats(lengths)
            report["length_handling"] = length_report
    except UserError as err:
        report["reason"] = str(err)
        return report
    kept, filter_reports = apply_filters(examples)
    report["filters"] = filter_reports
    report["kept_after_filters"] = len(kept)
    report["usable"] = True
    return report


def format_check_report(report: dict) -> str:
    """The report as a few lines for people."""
    lines = [
        f"{report['path']}: {report['rows']} rows; columns: {', '.join(report['columns'])}",
    ]
    if not report["usable"]:
        lines.append(f"not usable for {report['command']}: {report['reason']}")
        return "\n".join(lines)
    lines.append(
        f"format: {report['format']} -> {report['examples']} examples for {report['command']}"
    )
    lines.append("sample:")
    for key, value in report["sample"].items():
        lines.append(f"  {key}: {shorten(value)}")
    for unit, stats in report["lengths"].items():
        if stats:
            numbers = ", ".join(f"{k} {v}" for k, v in stats.items())
            lines.append(f"length ({unit}): {numbers}")
    handling = report.get("length_handling")
    if handling and handling["max_length"] is not None:
        lines.append(
            f"max_length {handling['max_length']} ({handling['on_too_long']}): "
            f"{handling['kept']} kept, {handling['truncated']} truncated, "
            f"{handling['dropped_too_long'] + handling['dropped_prompt_too_long']} dropped"
            + (
                f", {handling['split']} split into {handling['blocks']} blocks"
                if handling.get("split")
                else ""
            )
        )
    for step in report["filters"]:
        reasons = ", ".join(f"{k} {v}" for k, v in step["reasons"].items() if v)
        lines.append(
            f"filter {step['filter']}: dropped {step['dropped']} of {step['total']}"
            + (f" ({reasons})" if reasons else "")
        )
    lines.append(f"after filters: {report['kept_after_filters']} examples")
    return "\n".join(lines)


def shorten(value, width: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
