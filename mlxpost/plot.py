"""Training curves from a run's metrics.jsonl, as PNG files (`mlxpost plot`).

Writes `curves.png`, every metric in one grid of panels for a glance at the run, and
`<metric>.png` per metric to look at one closely or put in a report. Each line of
metrics.jsonl is a JSON object with a numeric "step"; every other numeric value is a point
of the metric it names, so eval metrics logged at some steps only simply have fewer points.
"""

from __future__ import annotations

import json
import math
import os
import re

from mlxpost.errors import UserError

METRICS_FILE = "metrics.jsonl"
GRID_FILE = "curves.png"
GRID_COLUMNS = 3
# Sparse series (evaluations) get markers: a line between a few points hides where they are.
MARKER_MAX_POINTS = 50


def _is_number(value) -> bool:
    # bool is an int in Python but not a metric; inf/NaN (which json accepts) cannot be drawn.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_metrics(path: str) -> dict[str, tuple[list[float], list[float]]]:
    """{metric: (steps, values)} in file order; non-numeric values are skipped."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: expected a JSON object")
            step = record.get("step")
            if not _is_number(step):
                raise UserError(f'{path}:{number}: no numeric "step" (got {step!r})')
            for name, value in record.items():
                if name != "step" and _is_number(value):
                    steps, values = series.setdefault(name, ([], []))
                    steps.append(step)
                    values.append(value)
    return series


def _file_names(metrics: list[str]) -> list[str]:
    """A distinct PNG name per metric ("eval/loss" -> eval_loss.png), never the grid's."""
    taken = {GRID_FILE}
    names = []
    for metric in metrics:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", metric).strip("._") or "metric"
        name, suffix = f"{stem}.png", 2
        while name in taken:
            name, suffix = f"{stem}-{suffix}.png", suffix + 1
        taken.add(name)
        names.append(name)
    return names


def _draw(axes, metric: str, steps: list[float], values: list[float]) -> None:
    marker = "o" if len(steps) <= MARKER_MAX_POINTS else None
    axes.plot(steps, values, marker=marker, markersize=3, linewidth=1.2)
    axes.set_title(metric)
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)


def plot_run(run_dir: str, output_dir: str | None = None) -> list[str]:
    """Draw RUN_DIR/metrics.jsonl into output_dir (default RUN_DIR/plots); returns the paths."""
    # Agg through the object API: no display needed and no pyplot global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: run directory not found")
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found; a run directory holds {METRICS_FILE}")
    series = read_metrics(path)
    if not series:
        raise UserError(f"{path}: no numeric metrics to plot")
    output_dir = output_dir or os.path.join(run_dir, "plots")
    os.makedirs(output_dir, exist_ok=True)

    metrics = list(series)
    columns = min(GRID_COLUMNS, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    grid = Figure(figsize=(4.5 * columns, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(grid)
    for index, metric in enumerate(metrics):
        _draw(grid.add_subplot(rows, columns, index + 1), metric, *series[metric])
    written = [os.path.join(output_dir, GRID_FILE)]
    grid.savefig(written[0], dpi=100)

    for metric, name in zip(metrics, _file_names(metrics)):
        figure = Figure(figsize=(6.4, 4.0), layout="constrained")
        FigureCanvasAgg(figure)
        _draw(figure.add_subplot(), metric, *series[metric])
        written.append(os.path.join(output_dir, name))
        figure.savefig(written[-1], dpi=100)
    return written
