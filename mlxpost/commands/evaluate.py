"""`mlxpost eval`: evaluate a model (and adapter) on a task."""

from __future__ import annotations

import json

import click

from mlxpost.backend import DTYPES
from mlxpost.commands import BACKENDS, json_safe, load_model_and_tokenizer


@click.command("eval")
@click.option(
    "--task",
    type=click.Choice(["math"]),
    default="math",
    show_default=True,
    help="math: GSM8K-style exact match of the final number.",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(),
    default=None,
    help="Checkpoint directory; default: the bundled model.",
)
@click.option(
    "--adapter", type=click.Path(), default=None, help="PEFT LoRA adapter directory to apply."
)
@click.option(
    "--data",
    "data_path",
    default=None,
    help="Dataset (question/answer or prompt/answer); default: the bundled math test split.",
)
@click.option(
    "--backend",
    "backend_name",
    type=click.Choice(BACKENDS),
    default="auto",
    show_default=True,
    help="auto: mlx on Apple Silicon, torch elsewhere.",
)
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--limit", type=int, default=None, help="Evaluate the first N examples only.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option(
    "--temperature", type=float, default=0.0, show_default=True, help="0: greedy decoding."
)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def evaluate(
    task,
    model_path,
    adapter,
    data_path,
    backend_name,
    dtype,
    limit,
    max_new_tokens,
    temperature,
    top_p,
    top_k,
    batch_size,
    seed,
    as_json,
):
    """Evaluate a model (and adapter) on a task.

    \b
    math: greedy by default; the final number is read from `#### N`,
          "The answer is N", or the last number, and compared numerically.
    """
    from mlxpost.assets import default_data, default_model
    from mlxpost.evaluation import MathEvalConfig, evaluate_math, math_examples

    model_path = model_path or default_model()
    data_path = data_path or default_data("eval-math")
    examples = math_examples(data_path, limit)
    backend, model, info = load_model_and_tokenizer(backend_name, model_path, adapter, dtype)
    click.echo(
        f"eval {task}: {len(examples)} examples from {data_path}, {backend.describe()}", err=True
    )
    cfg = MathEvalConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        batch_size=batch_size,
        seed=seed,
    )
    report = evaluate_math(backend, model, info, examples, cfg)
    report["backend"] = backend.name
    if as_json:
        click.echo(json.dumps(json_safe(report)))
        return
    click.echo(f"accuracy {report['accuracy']:.3f} on {report['n']} problems ({backend.name})")
    for level, value in report.get("accuracy_by_level", {}).items():
        click.echo(f"  level {level}: {value:.3f}")
    click.echo(
        f"answered {report['answered']:.3f}, mean completion {report['mean_completion_tokens']:.1f} tokens, truncated {report['truncated']:.3f}"
    )
