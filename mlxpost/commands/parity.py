"""`mlxpost parity`: cross-backend numerics on a user's checkpoint."""

from __future__ import annotations

import json
import sys

import click

from mlxpost.backend import DTYPES
from mlxpost.commands import json_safe


@click.command()
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
