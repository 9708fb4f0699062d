"""`mlxpost parity`: cross-backend numerics on a user's checkpoint."""

from __future__ import annotations

import json
import sys

import click

from mlxpost.backend import DTYPES
from mlxpost.errors import UserError
from mlxpost.run import json_safe

# The longest prompt mlxpost.parity's greedy check decodes from.
GREEDY_PROMPT_TOKENS = 12


@click.command()
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(),
    help="Local Hugging Face checkpoint directory (GPT-2 or Gemma-2), or a Hub id (org/name).",
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
    from mlxpost.hub import locate_model
    from mlxpost.model_dir import max_positions, read_config
    from mlxpost.parity import ParitySetup, default_seq_len, format_table, run_parity

    for name, value in (("--batch-size", batch_size), ("--greedy-tokens", greedy_tokens)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if seed < 0:
        raise UserError(f"--seed must be 0 or positive, got {seed}")
    # Bad input is reported before any backend is imported.
    if adapter:
        load_adapter(adapter)
    model_path = locate_model(model_path, "--model")
    config = read_config(model_path, tokenizer=False)  # parity feeds random token ids
    positions = max_positions(config)
    if seq_len is not None and not 2 <= seq_len <= (positions or seq_len):
        raise UserError(
            f"--seq-len must be between 2 and the model's {positions} positions, got {seq_len}"
        )
    rows = seq_len or default_seq_len(config)
    if batch_size > rows:
        raise UserError(f"--batch-size {batch_size} exceeds the {rows} tokens per row")
    if positions and GREEDY_PROMPT_TOKENS + greedy_tokens > positions:
        raise UserError(
            f"--greedy-tokens {greedy_tokens} runs past the model's {positions} positions "
            f"(prompts of up to {GREEDY_PROMPT_TOKENS} tokens)"
        )
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
