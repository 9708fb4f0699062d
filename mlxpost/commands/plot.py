"""`mlxpost plot`: training curves of a run as PNG files."""

from __future__ import annotations

import click


@click.command()
@click.argument("run_dir", type=click.Path())
@click.option(
    "--output",
    type=click.Path(),
    default=None,
    help="Directory for the PNG files; default: RUN_DIR/plots.",
)
def plot(run_dir, output):
    """Draw the curves in RUN_DIR/metrics.jsonl as PNG files.

    Writes curves.png (every metric, one panel each) and one PNG per metric,
    named after it (eval/loss -> eval_loss.png). Prints the paths written.
    """
    from mlxpost.plot import plot_run

    click.echo(f"plot: {run_dir}", err=True)
    for path in plot_run(run_dir, output):
        click.echo(path)
