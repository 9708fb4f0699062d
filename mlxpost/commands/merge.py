"""`mlxpost merge` and `mlxpost soup`: fold LoRA adapters into a checkpoint, average models."""

from __future__ import annotations

import click

from mlxpost.errors import UserError
from mlxpost.merge import SOUP_MODES


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError as err:
        raise UserError(f"--weights {text!r}: expected comma-separated numbers") from err


@click.command()
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(),
    help="Base checkpoint directory the adapter was trained on (GPT-2 or Gemma-2), or its "
    "Hugging Face Hub id (org/name).",
)
@click.option("--adapter", required=True, type=click.Path(), help="PEFT LoRA adapter directory.")
@click.option(
    "--output",
    required=True,
    type=click.Path(),
    help="Directory for the merged checkpoint; must not exist or be empty.",
)
@click.option("--force", is_flag=True, help="Replace --output if it exists and is not empty.")
def merge(model_path, adapter, output, force):
    """Fold a LoRA adapter into its base model: W' = W + lora_alpha/r * B @ A.

    Writes a standalone checkpoint that loads without PEFT: one model.safetensors
    with the base's key names and dtypes, plus the base's config, tokenizer and
    other non-weight files. The output appears whole or not at all: it is built
    in a temporary directory beside it, then renamed. Prints the output path.
    """
    from mlxpost.hub import locate_model
    from mlxpost.merge import merge_adapter

    model_path = locate_model(model_path, "--model")

    def announce():  # once the inputs are checked: an error is then the only line on stderr
        click.echo(f"merge: {adapter} into {model_path}", err=True)

    click.echo(merge_adapter(model_path, adapter, output, force=force, announce=announce))


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option(
    "--output",
    required=True,
    type=click.Path(),
    help="Directory for the result; must not exist or be empty.",
)
@click.option(
    "--weights",
    default=None,
    help="Comma-separated weights, one per input, normalised to sum 1 (e.g. 1,3). Default: equal.",
)
@click.option(
    "--mode",
    type=click.Choice(SOUP_MODES),
    default=None,
    help="Adapters only. factors (default): average lora_A and lora_B, write an adapter. "
    "update: fold the exact average update into --model, write a checkpoint.",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(),
    default=None,
    help="Base checkpoint directory (or Hugging Face Hub id) for --mode update.",
)
@click.option("--force", is_flag=True, help="Replace --output if it exists and is not empty.")
def soup(inputs, output, weights, mode, model_path, force):
    """Average several LoRA adapters, or several full checkpoints, of one base model.

    \b
    Adapters, --mode factors: lora_A and lora_B are averaged separately, which
      approximates averaging the updates only for adapters that share their
      initialisation (mlxpost's init does for the same --seed). Rank, alpha and
      target modules must match.
    Adapters, --mode update --model BASE: writes BASE + sum of w_i * alpha_i/r_i
      * B_i @ A_i, the exact average of the updates; ranks may differ.
    Checkpoints (directories with config.json): every floating tensor is
      averaged; config and tokenizer come from the first.

    Prints the output path.
    """
    from mlxpost.hub import locate_model
    from mlxpost.merge import soup as make_soup

    if mode == "update":  # otherwise --model is refused below, not downloaded first
        model_path = locate_model(model_path, "--model")

    def announce():  # once the inputs are checked: an error is then the only line on stderr
        click.echo(f"soup: {len(inputs)} inputs into {output}", err=True)

    click.echo(
        make_soup(
            list(inputs),
            output,
            weights=_parse_weights(weights),
            mode=mode,
            model_dir=model_path,
            force=force,
            announce=announce,
        )
    )
