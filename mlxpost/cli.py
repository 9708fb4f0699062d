"""The `mlxpost` command line.

Every command imports its backend lazily, prints progress on stderr and, with
--json, exactly one JSON object on stdout. Bad input (a missing file, an
unsupported model) ends with exit status 2 and one line naming what is wrong.
"""

from __future__ import annotations

import json
import math
import sys

import click

from mlxpost.backend import DTYPES, BackendUnavailable
from mlxpost.errors import UserError


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def json_safe(value):
    """JSON has no inf/nan: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


class Group(click.Group):
    """Turns input errors raised anywhere below into exit status 2 without a traceback."""

    def invoke(self, ctx):
        from mlxpost.adapters import AdapterError

        try:
            return super().invoke(ctx)
        except (UserError, AdapterError, BackendUnavailable) as err:
            fail(str(err))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlxpost")
def main():
    """Post-train causal language models with MLX or PyTorch, with the same numerics.

    \b
    Validate numerics on your checkpoint:  mlxpost parity --model DIR
    Run `mlxpost COMMAND --help` for a command's options.
    """


@main.command()
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(),
    help="Local Hugging Face checkpoint directory (GPT-2 or Gemma-2).",
)
@click.option(
    "--adapter",
    type=click.Path(),
    default=None,
    help="PEFT LoRA adapter directory to load in both backends; default: a fresh random adapter.",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default="float32",
    show_default=True,
    help="Weights and activations dtype; logprobs are always float32.",
)
@click.option(
    "--seq-len",
    type=int,
    default=None,
    help="Tokens per row; default: longer than the sliding window.",
)
@click.option("--batch-size", type=int, default=3, show_default=True, help="Rows per padded batch.")
@click.option(
    "--greedy-tokens",
    type=int,
    default=32,
    show_default=True,
    help="Greedy tokens compared per prompt.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of a table."
)
def parity(model_path, adapter, dtype, seq_len, batch_size, greedy_tokens, seed, as_json):
    """Check that the MLX and PyTorch backends compute the same numbers.

    Loads the checkpoint in both backends and compares per-token logprobs on
    left- and right-padded batches, a loss and its LoRA gradients, one AdamW
    step, and greedy decoding. Exit status 0 iff every check is within its
    tolerance (see `mlxpost.parity` for how tolerances follow from rounding).
    """
    from mlxpost.adapters import load_adapter
    from mlxpost.checkpoint import read_config
    from mlxpost.parity import ParitySetup, format_table, run_parity

    read_config(model_path)  # bad input is reported before any backend is imported
    if adapter:
        load_adapter(adapter)
    setup = ParitySetup(
        model=model_path,
        adapter=adapter,
        dtype=dtype,
        seq_len=seq_len,
        batch_size=batch_size,
        greedy_tokens=greedy_tokens,
        seed=seed,
    )
    click.echo(f"parity: {model_path} ({dtype}), torch vs mlx", err=True)
    report = run_parity(setup)
    if as_json:
        click.echo(json.dumps(json_safe(report)))
    else:
        click.echo(format_table(report))
    sys.exit(0 if report["ok"] else 1)


# The commands `data check --for` knows; mlxpost.data.COMMANDS, spelled out here so
# that `mlxpost --help` does not import the data pipeline.
DATA_COMMANDS = ("sft", "rm", "dpo", "kto", "grpo", "ppo", "distill", "eval-math")


@main.group()
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


if __name__ == "__main__":
    main()
