"""`mlxpost data`: check datasets before training on them."""

from __future__ import annotations

import json

import click

from mlxpost.backend import BACKEND_CHOICES
from mlxpost.commands import fail
from mlxpost.errors import UserError
from mlxpost.run import json_safe

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
    help="Checkpoint directory or Hugging Face Hub id (org/name) whose tokenizer counts tokens "
    "and applies the chat template.",
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

    from mlxpost.data import check_dataset, format_check_report
    from mlxpost.hub import locate_model
    from mlxpost.tokenizer import load_tokenizer

    if max_length is not None:
        if not model_path:
            raise UserError("--max-length needs --model: lengths are counted in its tokens")
        if max_length < 2:
            raise UserError(f"--max-length must be at least 2, got {max_length}")
    model_path = locate_model(model_path, "--model")
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


@data.command("pairs")
@click.argument("path")
@click.option("--output", required=True, type=click.Path(), help="The .jsonl file to write.")
@click.option(
    "--model",
    "model_path",
    type=click.Path(),
    default=None,
    help="Checkpoint directory or Hugging Face Hub id (org/name) to sample from; default: the "
    "bundled model.",
)
@click.option("--adapter", type=click.Path(), default=None, help="LoRA adapter to apply.")
@click.option(
    "--backend",
    type=click.Choice(BACKEND_CHOICES),
    default="auto",
    show_default=True,
    help="auto: mlx on Apple Silicon, torch elsewhere.",
)
@click.option(
    "--rewards",
    default="math",
    show_default=True,
    help="Comma-separated reward functions (as for grpo): built-ins or module:function.",
)
@click.option("--reward-weights", default=None, help="Comma-separated weights, one per reward.")
@click.option(
    "--num-generations", default=8, show_default=True, help="Completions sampled per prompt."
)
@click.option("--temperature", default=1.0, show_default=True, help="Sampling temperature.")
@click.option("--max-new-tokens", default=128, show_default=True, help="Tokens per completion.")
@click.option(
    "--limit", type=int, default=None, help="Use the first N prompts only (N >= 1); default: all."
)
@click.option(
    "--min-gap",
    default=0.5,
    show_default=True,
    help="Smallest reward difference between chosen and rejected for a pair to be kept.",
)
@click.option("--seed", default=0, show_default=True, help="Sampling seed.")
def data_pairs(
    path,
    output,
    model_path,
    adapter,
    backend,
    rewards,
    reward_weights,
    num_generations,
    temperature,
    max_new_tokens,
    limit,
    min_gap,
    seed,
):
    """Make DPO pairs from a model's own samples: for each prompt of PATH (a dataset
    `mlxpost grpo` reads), sample completions, score them with reward functions and
    pair the best with the worst (on-policy preference data).

    \b
      mlxpost data pairs mlxpost/assets/data/rl/prompts.jsonl --limit 1000 --output pairs.jsonl
      mlxpost dpo --data pairs.jsonl
    """
    import math
    import os

    from mlxpost import assets
    from mlxpost.backend import SamplingConfig
    from mlxpost.commands import load_model_and_tokenizer
    from mlxpost.data import load_examples
    from mlxpost.hub import locate_model
    from mlxpost.pairs import sample_pairs
    from mlxpost.rewards import RewardSet

    if os.path.exists(output):
        raise UserError(f"{output}: already exists; give a new --output")
    if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise UserError(f"{output}: --output's folder does not exist")
    if num_generations < 2:
        raise UserError(f"--num-generations must be at least 2, got {num_generations}")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise UserError(
            f"--temperature must be positive (pairs need varied samples), got {temperature}"
        )
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 (leave it out for all prompts), got {limit}")
    if not math.isfinite(min_gap) or min_gap < 0:
        raise UserError(f"--min-gap must be 0 or positive, got {min_gap}")
    if seed < 0:
        raise UserError(f"--seed must be 0 or positive, got {seed}")
    reward_set = RewardSet.parse(rewards, reward_weights)
    model_path = locate_model(model_path, "--model")
    _, examples = load_examples(path, "grpo")
    examples = examples[:limit] if limit else examples
    backend_, model, info = load_model_and_tokenizer(
        backend, model_path or assets.DEFAULT_MODEL, adapter, "float32"
    )
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, n=num_generations
    )
    records, stats = sample_pairs(
        backend_,
        model,
        info,
        examples,
        reward_set,
        sampling,
        min_gap,
        seed,
        lambda message: click.echo(message, err=True),
    )
    partial = f"{output}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(partial, output)
    click.echo(
        f"{output}: {stats['pairs']} pairs from {stats['prompts']} prompts "
        f"({stats['samples']} samples, mean reward {stats['mean_reward']:.3f})"
    )
