"""`mlxpost eval`: evaluate a model (and adapter), or compare several, on a task."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace

import click

from mlxpost.assets import DATA, default_data
from mlxpost.backend import BACKEND_CHOICES, DTYPES
from mlxpost.commands import load_model_and_tokenizer
from mlxpost.errors import UserError
from mlxpost.run import json_safe

TASKS = ("math", "perplexity", "repetition", "reward")
# Held-out splits of the bundled data, so every task runs without --data.
DEFAULT_DATA = {
    "math": default_data("eval-math"),
    "perplexity": default_data("text-eval"),
    "repetition": os.path.join(DATA, "instructions", "test.jsonl"),
    "reward": default_data("rm-eval"),
}
# Generation is the slow part: sampling every prompt of a split is rarely needed to see loops.
DEFAULT_LIMITS = {"repetition": 100, "reward": 100}
# The --compare table's columns per task.
TABLE_FIGURES = {
    "math": ("accuracy", "answered", "mean_completion_tokens"),
    "perplexity": ("perplexity", "nll", "tokens"),
    "repetition": (
        "distinct_1",
        "distinct_2",
        "repeated_3gram_rate",
        "non_repetition",
        "mean_words",
    ),
    "reward": ("mean_score", "pairwise_accuracy"),
}
# The figures the --compare chart draws, one panel each (their scales differ).
CHART_FIGURES = {
    "math": ("accuracy",),
    "perplexity": ("perplexity",),
    "repetition": ("distinct_1", "distinct_2", "repeated_3gram_rate", "non_repetition"),
    "reward": ("mean_score",),
}


@dataclass
class Entry:
    label: str  # as the user wrote it
    model: str
    adapter: str | None


def task_parts(task: str):
    """(options dataclass, data loader, evaluator) of a task, imported only when it runs."""
    from mlxpost import evaluation as ev

    return {
        "math": (ev.MathEvalConfig, ev.math_examples, ev.evaluate_math),
        "perplexity": (ev.PerplexityConfig, ev.lm_examples, ev.evaluate_perplexity),
        "repetition": (ev.RepetitionConfig, ev.prompt_conversations, ev.evaluate_repetition),
        "reward": (ev.RewardEvalConfig, ev.reward_examples, ev.evaluate_reward),
    }[task]


def task_config(task: str, config_class, options: dict):
    """The task's options: those given on the command line over the dataclass defaults."""
    known = {f.name for f in fields(config_class)}
    given = {name: value for name, value in options.items() if value is not None}
    for name in given:
        if name not in known:
            raise UserError(f"--{name.replace('_', '-')} does not apply to --task {task}")
    return config_class(**given)


def parse_compare(spec: str, base_model: str) -> list[Entry]:
    """Entries of --compare: checkpoint directories, or adapter directories put on base_model."""
    from mlxpost.adapters import CONFIG_FILE
    from mlxpost.hub import locate_model

    entries = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise UserError(f"--compare {spec!r}: empty entry; separate directories with commas")
        path = locate_model(item, "--compare")  # a Hub id: its cached snapshot
        if not os.path.isdir(path):
            raise UserError(f"{item}: --compare entry not found")
        if os.path.isfile(os.path.join(path, CONFIG_FILE)):
            entries.append(Entry(item, base_model, path))
        else:
            entries.append(Entry(item, path, None))
    return entries


def check_entry(entry: Entry) -> None:
    """Fail on a bad entry before any is evaluated, not after an hour of the others."""
    from mlxpost.adapters import load_adapter
    from mlxpost.model_dir import read_config

    read_config(entry.model)
    if entry.adapter:
        load_adapter(entry.adapter)


def evaluate_entry(task: str, entry: Entry, dataset, cfg, backend_name: str, dtype: str):
    """Load the entry afresh (no adapter carries over from another entry) and evaluate it on
    `dataset`, (path, examples)."""
    from mlxpost.model_dir import max_positions, read_config

    backend, model, info = load_model_and_tokenizer(backend_name, entry.model, entry.adapter, dtype)
    path, data = dataset
    click.echo(
        f"eval {task}: {entry.label}, {len(data)} examples from {path}, {backend.describe()}",
        err=True,
    )
    if task == "perplexity":
        cfg = replace(cfg, max_length=max_positions(read_config(entry.model)))
    report = task_parts(task)[2](backend, model, info, data, cfg)
    report["backend"] = backend.name
    return report


def echo_math(report: dict) -> None:
    click.echo(f"accuracy {report['accuracy']:.3f} on {report['n']} problems ({report['backend']})")
    for level, value in report.get("accuracy_by_level", {}).items():
        click.echo(f"  level {level}: {value:.3f}")
    click.echo(
        f"answered {report['answered']:.3f}, mean completion {report['mean_completion_tokens']:.1f} tokens, truncated {report['truncated']:.3f}"
    )


def echo_perplexity(report: dict) -> None:
    click.echo(
        f"perplexity {report['perplexity']:.3f} (nll {report['nll']:.4f}) on {report['n']} examples, {report['tokens']} tokens ({report['backend']})"
    )
    if report["truncated"] or report["dropped"]:
        click.echo(
            f"cut to {report['max_length']} tokens: {report['truncated']} truncated, {report['dropped']} dropped (prompt too long)"
        )


def echo_repetition(report: dict) -> None:
    click.echo(
        f"distinct-1 {report['distinct_1']:.3f}, distinct-2 {report['distinct_2']:.3f} over {report['n']} generations ({report['backend']})"
    )
    click.echo(
        f"repeated 3-grams {report['repeated_3gram_rate']:.3f} per generation, non-repetition {report['non_repetition']:.3f}"
    )
    click.echo(
        f"mean length {report['mean_words']:.1f} words, {report['mean_completion_tokens']:.1f} tokens, truncated {report['truncated']:.3f}"
    )


def echo_reward(report: dict) -> None:
    if report["source"] == "data":
        click.echo(
            f"pairwise accuracy {report['pairwise_accuracy']:.3f} on {report['n']} pairs, mean score {report['mean_score']:.4f} (chosen {report['chosen_mean_score']:.4f}, rejected {report['rejected_mean_score']:.4f}) ({report['backend']})"
        )
    else:
        click.echo(
            f"mean score {report['mean_score']:.4f} (std {report['score_std']:.4f}) over {report['n']} generations, mean {report['mean_completion_tokens']:.1f} tokens ({report['backend']})"
        )


ECHO = {
    "math": echo_math,
    "perplexity": echo_perplexity,
    "repetition": echo_repetition,
    "reward": echo_reward,
}


def format_figure(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def echo_table(task: str, labels: list[str], reports: list[dict]) -> None:
    """One row per entry, one column per figure, aligned."""
    header = ["entry", *TABLE_FIGURES[task]]
    rows = [
        [label, *(format_figure(report.get(name)) for name in TABLE_FIGURES[task])]
        for label, report in zip(labels, reports)
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        click.echo("  ".join(cells))


def chart_labels(labels: list[str]) -> list[str]:
    """Directory names, which fit under a bar; whole paths where names repeat."""
    names = [os.path.basename(os.path.normpath(label)) for label in labels]
    return names if len(set(names)) == len(names) else labels


def write_chart(task: str, labels: list[str], reports: list[dict], path: str) -> None:
    """A PNG with one bar panel per charted figure, one bar per entry."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = CHART_FIGURES[task]
    width = max(4.0, 0.9 * len(labels) + 1.5)
    figure = Figure(figsize=(width * len(names), 4.0), layout="constrained")
    FigureCanvasAgg(figure)  # render without pyplot's global state
    positions = range(len(labels))
    for axes, name in zip(figure.subplots(1, len(names), squeeze=False)[0], names):
        values = [report.get(name) or 0.0 for report in reports]
        bars = axes.bar(positions, values, color=[f"C{i % 10}" for i in positions])
        axes.bar_label(bars, fmt="%.4g")
        axes.set_ylim(0, max(values) * 1.15 or 1.0)  # room for the labels; all-zero bars too
        axes.set_xticks(list(positions), chart_labels(labels), rotation=20, ha="right")
        axes.set_title(name)
    figure.suptitle(f"mlxpost eval --task {task}")
    figure.savefig(path, dpi=120)


def check_chart_path(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--chart {path}: folder {folder} not found")


def echo_comparison(task: str, labels: list[str], reports: list[dict], chart: str, as_json: bool):
    write_chart(task, labels, reports, chart)
    click.echo(f"chart: {chart}", err=True)
    if as_json:
        entries = [{"entry": label, **report} for label, report in zip(labels, reports)]
        click.echo(json.dumps(json_safe({"task": task, "entries": entries, "chart": chart})))
    else:
        echo_table(task, labels, reports)


@click.command("eval")
@click.option(
    "--task",
    type=click.Choice(TASKS),
    default="math",
    show_default=True,
    help="math: GSM8K-style exact match of the final number. perplexity: exp of the mean "
    "token NLL. repetition: diversity and loops of sampled completions. reward: "
    "reward-model scores (--reward-model).",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(),
    default=None,
    help="Checkpoint directory or Hugging Face Hub id (org/name); default: the bundled model. "
    "With --compare, the base of adapter entries.",
)
@click.option(
    "--adapter", type=click.Path(), default=None, help="PEFT LoRA adapter directory to apply."
)
@click.option(
    "--compare",
    default=None,
    metavar="DIR,DIR,...",
    help="Evaluate several entries, print one table and write a chart. Each entry is a "
    "checkpoint directory, or an adapter directory (has adapter_config.json) applied on "
    "top of --model.",
)
@click.option(
    "--chart",
    "chart_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="PNG bar chart of --compare; default: eval-compare-<task>.png here.",
)
@click.option(
    "--data",
    "data_path",
    default=None,
    help="Dataset; default: the bundled test split of the task (math: question/answer or "
    "prompt/answer; perplexity: text or any SFT format; repetition: any SFT format; reward: "
    "preference pairs, or prompts).",
)
@click.option(
    "--backend",
    "backend_name",
    type=click.Choice(BACKEND_CHOICES),
    default="auto",
    show_default=True,
    help="auto: mlx on Apple Silicon, torch elsewhere.",
)
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option(
    "--limit",
    type=int,
    default=None,
    help="Evaluate the first N examples only (N >= 1); default: all (repetition, reward: 100).",
)
@click.option(
    "--max-new-tokens",
    type=int,
    default=None,
    help="Default: 256 (math), 128 (repetition, reward).",
)
@click.option(
    "--temperature",
    type=float,
    default=None,
    help="0: greedy decoding. Default: 0 (math, reward), 1 (repetition).",
)
@click.option("--top-p", type=float, default=None, help="Default: 1 (off).")
@click.option("--top-k", type=int, default=None, help="Default: 0 (off).")
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="Default: 64 prompts (math, repetition, reward), 8 sequences (perplexity).",
)
@click.option("--seed", type=int, default=None, help="Sampling seed; default: 0.")
@click.option(
    "--reward-model",
    type=click.Path(),
    default=None,
    help="--task reward: the reward model, the final/ directory of an `mlxpost rm` run.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def eval_command(
    task,
    model_path,
    adapter,
    compare,
    chart_path,
    data_path,
    backend_name,
    dtype,
    limit,
    as_json,
    **options,
):
    """Evaluate a model (and adapter) on a task, or compare several with --compare.

    \b
    math:       greedy by default; the final number is read from `#### N`,
                "The answer is N", or the last number, and compared numerically.
    perplexity: exp of the mean NLL per token: every token of a `text` row but
                the first, or the completion of a prompt/completion row.
                Sequences are cut to the model's max positions (counted).
                Comparable only between models sharing a tokenizer.
    repetition: one sampled completion per prompt, split on whitespace.
                distinct-1/2: unique / total uni- and bigrams over all completions.
                repeated_3gram_rate: mean share of a completion's 3-grams that
                repeat an earlier one. non_repetition: share of completions
                whose repeated-4-gram share is at most 0.3 (1: none loops).
    reward:     --reward-model DIR scores the model's greedy completions to the
                prompts (mean_score); on preference data (chosen/rejected) it
                scores the data's pairs: mean_score and pairwise_accuracy.

    \b
    Compare a base model with two adapters trained on it (one table, one PNG):
      mlxpost eval --task perplexity --model BASE --compare BASE,run1/adapter,run2/adapter
    """
    from mlxpost.assets import default_model
    from mlxpost.hub import locate_model

    label = model_path or default_model()
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 (leave it out for all examples), got {limit}")
    if compare and adapter:
        raise UserError("--adapter does not apply with --compare: list adapter directories there")
    if chart_path and not compare:
        raise UserError("--chart applies with --compare only")
    config_class, load_data, _ = task_parts(task)
    cfg = task_config(task, config_class, options)  # option values before any file is read
    model_path = locate_model(label, "--model")  # a Hub id: its cached snapshot
    entries = parse_compare(compare, model_path) if compare else [Entry(label, model_path, adapter)]
    for entry in entries:
        check_entry(entry)
    chart_path = chart_path or f"eval-compare-{task}.png"
    if compare:
        check_chart_path(chart_path)  # before the evaluation, not after it
    data_path = data_path or DEFAULT_DATA[task]
    data = load_data(data_path, limit if limit is not None else DEFAULT_LIMITS.get(task))
    # Progress starts once every input is checked, so a bad one is the only line on stderr.
    reports = [
        evaluate_entry(task, e, (data_path, data), cfg, backend_name, dtype) for e in entries
    ]
    if compare:
        echo_comparison(task, [entry.label for entry in entries], reports, chart_path, as_json)
    elif as_json:
        click.echo(json.dumps(json_safe(reports[0])))
    else:
        ECHO[task](reports[0])
