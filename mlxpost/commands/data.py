"""`mlxpost data`: check datasets before training on them."""

from __future__ import annotations

import json

import click

from mlxpost.commands import fail, json_safe
from mlxpost.errors import UserError

# The commands `data check --for` knows; mlxpost.data.COMMANDS, spelled out here so
# that `mlxpost --help` does not import the data pipeline.
DATA_COMMANDS = ("sft", "rm", "dpo", "kto", "grpo", "ppo", "distill", "eval-math")


@click.group()
def data():
    """Check datasets before training on them."""


@data.command("check")
@click.argument("path")
@click.option(
    "--for",
    "command",
    required=True,
    type=click.Choice(DATA_COMMANDS),
    help="The command that will read the dataset.",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(),
    default=None,
    help="Checkpoint directory whose tokenizer counts tokens and applies the chat template.",
)
@click.option("--split", default=None, help="Split of a DatasetDict or Hub dataset.")
@click.option(
    "--max-length",
    type=int,
    default=None,
    help="Report how many examples exceed this many tokens (needs --model).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of text."
)
def data_check(path, command, model_path, split, max_length, as_json):
    """Check that PATH (.jsonl, .json, .parquet, .csv, a save_to_disk directory or a
    Hub name) is usable for a command.

    Prints the detected format, a normalised sample, lengths and what the
    default filters would drop. Exit status 0 if the command can use the
    dataset, 2 with the reason if not.
    """
    import os

    import datasets

    from mlxpost.data import check_dataset, format_check_report
    from mlxpost.tokenizer import load_tokenizer

    datasets.disable_progress_bars()  # stderr is for the one-line error
    if model_path and not os.path.isdir(model_path):
        # Checked here: AutoTokenizer would take a missing path for a Hub name.
        raise UserError(f"{model_path}: not found")
    tokenizer = load_tokenizer(model_path).tokenizer if model_path else None
    report = check_dataset(path, command, tokenizer=tokenizer, split=split, max_length=max_length)
    if as_json:
        click.echo(json.dumps(json_safe(report), default=str))
    else:
        click.echo(format_check_report(report))
    if not report["usable"]:
        fail(report["reason"])
