"""`mlxpost export`: a checkpoint (and adapter) as an MLX model directory or a GGUF file."""

from __future__ import annotations

import click

from mlxpost.assets import default_model
from mlxpost.errors import UserError
from mlxpost.export import DEFAULT_GROUP_SIZE, FORMATS, GGUF_OUTTYPES, MLX_DTYPES


@click.command()
@click.option(
    "--model",
    "model_path",
    default=None,
    type=click.Path(),
    help="Checkpoint directory, or its Hugging Face Hub id (org/name); default: the bundled model.",
)
@click.option(
    "--adapter",
    type=click.Path(),
    default=None,
    help="PEFT LoRA adapter directory to fold into the model first.",
)
@click.option("--format", "fmt", required=True, type=click.Choice(FORMATS), help="What to write.")
@click.option(
    "--output",
    required=True,
    type=click.Path(),
    help="Directory to write; must not exist or be empty.",
)
@click.option(
    "--quantize",
    type=click.Choice(["4", "8"]),
    default=None,
    help="mlx: quantize the linear layers and embeddings to this many bits (MLX affine).",
)
@click.option(
    "--group-size",
    type=int,
    default=DEFAULT_GROUP_SIZE,
    show_default=True,
    help="mlx: weights per quantization group (32, 64 or 128).",
)
@click.option(
    "--dtype",
    type=click.Choice(MLX_DTYPES),
    default=None,
    help="mlx: dtype of the unquantized weights; default: the checkpoint's.",
)
@click.option(
    "--outtype",
    type=click.Choice(GGUF_OUTTYPES),
    default="f16",
    show_default=True,
    help="gguf: type of the matrices (norms, biases and rope factors stay f32).",
)
@click.option("--force", is_flag=True, help="Replace --output if it exists and is not empty.")
def export(model_path, adapter, fmt, output, quantize, group_size, dtype, outtype, force):
    """Write a model for inference engines, with --adapter folded in.

    \b
    --format mlx   a directory that mlx_lm.load opens (written by mlx-lm itself),
                   optionally quantized (--quantize 4|8, --group-size).
    --format gguf  OUTPUT/model.gguf for llama.cpp (llama, mistral, qwen2, qwen3 with a
                   byte-level BPE tokenizer), --outtype f32, f16, bf16 or q8_0.

    Where the engine computes otherwise than transformers (a sliding window it lacks,
    a soft-cap it skips) a warning says so; what it cannot load is refused. The output
    appears whole or not at all. Prints the output path.
    """
    from mlxpost.export import export_model
    from mlxpost.hub import locate_model

    source = click.get_current_context().get_parameter_source("outtype")
    if fmt == "mlx" and source is not click.core.ParameterSource.DEFAULT:
        raise UserError("--outtype applies to --format gguf; use --quantize or --dtype for mlx")
    model_path = locate_model(model_path or default_model(), "--model")

    def announce():  # once the inputs are checked: an error is then the only line on stderr
        click.echo(f"export: {model_path} to {fmt} in {output}", err=True)

    def warn(message):
        click.echo(f"warning: {message}", err=True)

    click.echo(
        export_model(
            model_path,
            output,
            fmt,
            adapter,
            quantize=int(quantize) if quantize else None,
            group_size=group_size,
            dtype=dtype,
            outtype=outtype,
            force=force,
            announce=announce,
            warn=warn,
        )
    )
