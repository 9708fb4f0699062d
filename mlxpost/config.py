"""Training configuration: dataclasses whose fields are the CLI options.

Each command's config is a dataclass; every field carries its help text and
becomes one click option (`learning_rate` -> `--learning-rate`). Values are
resolved as command-line flags > YAML (`--config FILE`) > defaults, and only
then is the dataclass built, so library code never sees the CLI.
"""

from __future__ import annotations

import dataclasses
import os
import time
import typing
from dataclasses import dataclass, field

import click
import yaml

from mlxpost.errors import UserError


def option(default, help: str, choices: tuple | None = None, flag: str | None = None):
    """A config field with its help text (and choices, or an on/off flag pair)."""
    metadata = {"help": help}
    if choices:
        metadata["choices"] = choices
    if flag:
        metadata["flag"] = flag
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Options every training command shares (DESIGN.md's CLI contract)."""

    backend: str = option(
        "auto",
        "mlx, torch, or auto: mlx on Apple Silicon, torch elsewhere.",
        ("auto", "mlx", "torch"),
    )
    model: str | None = option(
        None, "Local Hugging Face checkpoint directory; default: the bundled tiny model."
    )
    data: str | None = option(
        None,
        "jsonl/json/parquet/csv file or save_to_disk directory, or several comma-separated (concatenated); default: the bundled dataset.",
    )
    eval_data: str | None = option(
        None, "Held-out dataset; default: the bundled test split of the default data."
    )
    output: str | None = option(None, "Run directory; default: runs/<command>-<time>.")
    steps: int = option(200, "Optimizer steps.")
    batch_size: int = option(16, "Examples per optimizer step.")
    grad_accum: int = option(
        1, "Split each batch into this many microbatches (gradient accumulation)."
    )
    learning_rate: float = option(1e-4, "Peak learning rate (AdamW).")
    warmup_steps: int = option(10, "Linear warmup steps.")
    min_lr_ratio: float = option(0.1, "The cosine schedule ends at learning_rate * min_lr_ratio.")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay.")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm (0: no clipping).")
    seed: int = option(0, "Seed for data order, adapter init, dropout and sampling.")
    lora: bool = option(
        True, "Train a LoRA adapter (--lora) or every weight (--full).", flag="--lora/--full"
    )
    lora_rank: int = option(8, "LoRA rank r.")
    lora_alpha: float = option(16.0, "LoRA alpha; the update is scaled by alpha / r.")
    lora_dropout: float = option(0.0, "Dropout on the LoRA input path.")
    lora_targets: str | None = option(
        None, "Comma-separated module names; default: every attention and MLP projection."
    )
    dtype: str = option(
        "float32",
        "Model dtype; logprobs and adapters stay float32.",
        ("float32", "bfloat16", "float16"),
    )
    max_length: int = option(256, "Tokens per example at most.")
    eval_every: int = option(50, "Evaluate every N steps (0: only at the end).")
    save_every: int = option(100, "Checkpoint every N steps (0: only the final one).")
    resume: bool = option(False, "Continue from the newest checkpoint in --output.")

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise UserError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.batch_size % self.grad_accum:
            raise UserError(
                f"--batch-size {self.batch_size} is not a multiple of --grad-accum {self.grad_accum}"
            )
        if self.resume and not self.output:
            raise UserError("--resume needs --output: the run directory to continue")

    def lora_target_list(self) -> tuple[str, ...] | None:
        return (
            tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
            if self.lora_targets
            else None
        )


def default_output(command: str) -> str:
    return os.path.join("runs", f"{command}-{time.strftime('%Y%m%d-%H%M%S')}")


def _click_type(f: dataclasses.Field, hints: dict):
    if "choices" in f.metadata:
        return click.Choice(f.metadata["choices"])
    kind = hints[f.name]
    for base in (bool, int, float, str):
        if kind is base or (
            typing.get_origin(kind) is typing.Union and base in typing.get_args(kind)
        ):
            return base
    return str


def cli_options(config_cls):
    """Decorator adding one click option per dataclass field, plus --config."""
    hints = typing.get_type_hints(config_cls)

    def decorate(command):
        for f in reversed(dataclasses.fields(config_cls)):
            if not f.init:
                continue
            flag = "--" + f.name.replace("_", "-")
            kind = _click_type(f, hints)
            if f.metadata.get("flag"):
                decl = click.option(
                    f.metadata["flag"],
                    f.name,
                    default=f.default,
                    show_default=True,
                    help=f.metadata["help"],
                )
            elif kind is bool:
                decl = click.option(
                    flag, f.name, is_flag=True, default=f.default, help=f.metadata["help"]
                )
            else:
                decl = click.option(
                    flag,
                    f.name,
                    type=kind,
                    default=f.default,
                    show_default=f.default is not None,
                    help=f.metadata["help"],
                )
            command = decl(command)
        return click.option(
            "--config",
            "config_file",
            type=click.Path(),
            default=None,
            help="YAML file with any of these options; command-line flags win.",
        )(command)

    return decorate


def resolve(config_cls, ctx: click.Context, values: dict, config_file: str | None):
    """Flags given on the command line > YAML > dataclass defaults."""
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    merged = {}
    if config_file:
        merged.update(read_yaml(config_file, names))
    for name in names:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name == "COMMANDLINE" or name not in merged:
            merged[name] = values[name]
        else:
            merged[name] = coerce(config_cls, name, merged[name], config_file)
    return config_cls(**merged)


def coerce(config_cls, name: str, value, source: str):
    """YAML 1.1 reads `1e-4` as a string: convert to the field's type, or say what is wrong."""
    f = next(f for f in dataclasses.fields(config_cls) if f.name == name)
    kind = _click_type(f, typing.get_type_hints(config_cls))
    if value is None or isinstance(kind, click.Choice) and value in kind.choices:
        return value
    if isinstance(kind, click.Choice):
        raise UserError(f"{source}: {name} must be one of {', '.join(kind.choices)}, got {value!r}")
    try:
        if kind is bool and not isinstance(value, bool):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: {name} must be a {kind.__name__}, got {value!r}") from None


def read_yaml(path: str, names: set[str]) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{path}: config file not found")
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: expected a mapping of option: value")
    loaded = {k.replace("-", "_"): v for k, v in loaded.items()}
    unknown = sorted(set(loaded) - names)
    if unknown:
        raise UserError(f"{path}: unknown option(s) {', '.join(unknown)}")
    return loaded


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
