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
import types
import typing
from dataclasses import dataclass, field

import click
import yaml

from mlxpost.backend import BACKEND_CHOICES, DTYPES, LoraConfig, OptimConfig
from mlxpost.errors import UserError
from mlxpost.trackers import parse_report_to

BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_COMPARE = {
    "gt": lambda value, bound: value > bound,
    "ge": lambda value, bound: value >= bound,
    "lt": lambda value, bound: value < bound,
    "le": lambda value, bound: value <= bound,
}


def option(
    default,
    help: str,
    choices: tuple | None = None,
    flag: str | None = None,
    **bounds: float,
):
    """A config field with its help text (and choices, or an on/off flag pair).

    `bounds` (gt, ge, lt, le) state the values the option accepts; `validate`
    checks them when the config is built, before any model or data is loaded.
    """
    metadata = {"help": help}
    if choices:
        metadata["choices"] = choices
    if flag:
        metadata["flag"] = flag
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"unknown bound(s) {sorted(unknown)}; use {', '.join(BOUNDS)}")
    if bounds:
        metadata["bounds"] = bounds
    return field(default=default, metadata=metadata)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def inherited_bounds(config_cls, name: str) -> dict | None:
    """A field's bounds; a subclass that only changes its default or help keeps them."""
    for cls in config_cls.__mro__:
        fields = getattr(cls, "__dataclass_fields__", {})
        if name in fields and fields[name].metadata.get("bounds"):
            return fields[name].metadata["bounds"]
    return None


def validate(config) -> None:
    """Every field with bounds holds a value inside them (None: not set, always allowed)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        bounds = inherited_bounds(type(config), f.name)
        if value is None or not bounds or isinstance(value, bool):
            continue
        # NaN compares false with everything, so it fails every bound.
        if not all(_COMPARE[kind](value, bound) for kind, bound in bounds.items()):
            wanted = " and ".join(f"{BOUNDS[kind]} {bound:g}" for kind, bound in bounds.items())
            raise UserError(f"{flag_name(f.name)} must be {wanted}, got {value}")


@dataclass
class TrainConfig:
    """Options every training command shares (DESIGN.md's CLI contract)."""

    backend: str = option(
        "auto",
        "mlx, torch, or auto: mlx on Apple Silicon, torch elsewhere.",
        BACKEND_CHOICES,
    )
    model: str | None = option(
        None,
        "Local Hugging Face checkpoint directory, or a Hub id (org/name: from the Hugging Face cache, downloaded if missing); default: the bundled tiny model.",
    )
    data: str | None = option(
        None,
        "jsonl/json/parquet/csv file or save_to_disk directory, or several comma-separated (concatenated); default: the bundled dataset.",
    )
    eval_data: str | None = option(
        None, "Held-out dataset; default: the bundled test split of the default data."
    )
    output: str | None = option(None, "Run directory; default: runs/<command>-<time>.")
    steps: int = option(200, "Optimizer steps.", ge=1)
    batch_size: int = option(16, "Examples per optimizer step.", ge=1)
    grad_accum: int = option(
        1, "Split each batch into this many microbatches (gradient accumulation).", ge=1
    )
    learning_rate: float = option(1e-4, "Peak learning rate (AdamW).", gt=0)
    warmup_steps: int = option(10, "Linear warmup steps.", ge=0)
    min_lr_ratio: float = option(
        0.1, "The cosine schedule ends at learning_rate * min_lr_ratio.", ge=0, le=1
    )
    weight_decay: float = option(0.0, "AdamW decoupled weight decay.", ge=0)
    max_grad_norm: float = option(1.0, "Clip the global gradient norm (0: no clipping).", ge=0)
    seed: int = option(0, "Seed for data order, adapter init, dropout and sampling.", ge=0)
    lora: bool = option(
        True, "Train a LoRA adapter (--lora) or every weight (--full).", flag="--lora/--full"
    )
    lora_rank: int = option(8, "LoRA rank r.", ge=1)
    lora_alpha: float = option(16.0, "LoRA alpha; the update is scaled by alpha / r.", gt=0)
    lora_dropout: float = option(0.0, "Dropout on the LoRA input path.", ge=0, lt=1)
    lora_targets: str | None = option(
        None, "Comma-separated module names; default: every attention and MLP projection."
    )
    quantize: int | None = option(
        None,
        "QLoRA: quantize the frozen base's transformer-block linear layers to this many bits "
        "(affine, groups of 64) under the LoRA adapter; mlx backend only.",
        (4, 8),
    )
    dtype: str = option(
        "float32",
        "Model dtype; logprobs and adapters stay float32.",
        DTYPES,
    )
    max_length: int = option(256, "Tokens per example at most.", ge=2)
    grad_checkpoint: bool = option(
        False,
        "Recompute each transformer block's activations in the backward pass instead of keeping them: less memory, about a third more compute, the same numbers.",
        flag="--grad-checkpoint/--no-grad-checkpoint",
    )
    fsdp: bool = option(
        False,
        "Full fine-tuning sharded over the ranks of a torchrun launch (torch's FSDP2): each rank holds its share of the weights, gradients and AdamW moments instead of all of them, for a model whose training state does not fit one device; the same numbers. Needs --full and --backend torch; every command but ppo.",
        flag="--fsdp/--no-fsdp",
    )
    logits_chunk: int | None = option(
        None,
        "Token positions whose vocabulary-wide logits the loss computes at once; each chunk is recomputed in the backward pass, so the loss head's memory is chunk x vocabulary instead of batch x tokens x vocabulary, with the same numbers. 0: all at once. Default: as many as make 64 MB of float32 logits (65 positions for a 256,000-token vocabulary, whole batches for small ones).",
        ge=0,
    )
    eval_every: int = option(50, "Evaluate every N steps (0: only at the end).", ge=0)
    save_every: int = option(100, "Checkpoint every N steps (0: only the final one).", ge=0)
    max_nonfinite_steps: int = option(
        3,
        "Steps whose loss or gradient norm is NaN or inf are skipped (no update); after this many in a row the run stops with exit status 3.",
        ge=1,
    )
    report_to: str = option(
        "none",
        "Also send metrics.jsonl's rows to trackers, comma-separated: tensorboard (event files in <run>/tensorboard), wandb (a run in <run>/wandb; offline unless WANDB_API_KEY is set or WANDB_MODE says otherwise), or none.",
    )
    wandb_project: str | None = option(
        None,
        "Weights & Biases project for --report-to wandb; default: $WANDB_PROJECT, else mlxpost.",
    )
    resume: bool = option(
        False,
        "Continue the run in --output from its newest checkpoint, with the settings in its config.yaml; options given again may change only what does not alter the model or data (steps, cadence, evaluation, backend, trackers).",
    )

    def __post_init__(self):
        validate(self)
        parse_report_to(self.report_to)  # an unknown tracker name is refused before anything runs
        if self.batch_size % self.grad_accum:
            raise UserError(
                f"--batch-size {self.batch_size} is not a multiple of --grad-accum {self.grad_accum}"
            )
        if self.quantize is not None and not self.lora:
            raise UserError("--quantize trains a LoRA adapter on a quantized base; drop --full")
        if self.fsdp and self.lora:
            raise UserError(
                "--fsdp shards full fine-tuning: add --full (a LoRA adapter is small enough for "
                "plain data-parallel runs, which need no option)"
            )
        if self.fsdp and self.backend != "torch":
            raise UserError(f"--fsdp is torch's FSDP: use --backend torch, not {self.backend}")
        if self.resume and not self.output:
            raise UserError("--resume needs --output: the run directory to continue")

    def lora_target_list(self) -> tuple[str, ...] | None:
        return (
            tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
            if self.lora_targets
            else None
        )

    def lora_config(self) -> LoraConfig:
        return LoraConfig(
            self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_target_list()
        )

    def optim_config(self) -> OptimConfig:
        return OptimConfig(
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm or None,
            warmup_steps=self.warmup_steps,
            total_steps=self.steps,
            min_lr_ratio=self.min_lr_ratio,
        )


def default_output(command: str) -> str:
    return os.path.join("runs", f"{command}-{time.strftime('%Y%m%d-%H%M%S')}")


def _click_type(f: dataclasses.Field, hints: dict):
    if "choices" in f.metadata:
        return click.Choice(f.metadata["choices"])
    kind = hints[f.name]
    for base in (bool, int, float, str):
        if kind is base or (
            typing.get_origin(kind) in (typing.Union, types.UnionType)
            and base in typing.get_args(kind)
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


# Options a resumed run may change: they alter neither the model nor what it trains on.
CHANGEABLE_ON_RESUME = (
    "steps",
    "save_every",
    "eval_every",
    "backend",
    "output",
    "resume",
    "max_nonfinite_steps",
    "report_to",
    "wandb_project",
    "grad_checkpoint",
    "logits_chunk",
    "fsdp",
)


def changeable_on_resume(name: str) -> bool:
    return name in CHANGEABLE_ON_RESUME or name.startswith("eval_")


# Options naming a Hugging Face checkpoint, which may also be given as a Hub id (mlxpost.hub).
MODEL_OPTIONS = ("model", "reference", "teacher")


def locate_models(values: dict) -> dict:
    """`values` with each Hub id of a MODEL_OPTIONS entry replaced by its local snapshot."""
    from mlxpost.hub import locate_model

    return {
        name: locate_model(value, flag_name(name))
        if name in MODEL_OPTIONS and isinstance(value, str)
        else value
        for name, value in values.items()
    }


def resolve(config_cls, ctx: click.Context, values: dict, config_file: str | None, command: str):
    """Flags given on the command line > YAML > dataclass defaults.

    With --resume, the run's own config.yaml takes the place of the defaults, and an
    option given again may differ from it only if `changeable_on_resume`; anything else
    is refused before a file is read or written. A Hub id given for a model is replaced by
    its snapshot in the local Hugging Face cache (downloaded if need be) once the options
    are valid, so the config, and the run's config.yaml, hold a local directory."""
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    given = {}
    if config_file:
        given = {
            name: coerce(config_cls, name, value, config_file)
            for name, value in read_yaml(config_file, names).items()
        }
    for name in names:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name == "COMMANDLINE":
            given[name] = values[name]
    merged = {name: values[name] for name in names}
    if given.get("resume"):
        # What the run used: its config.yaml, and the defaults for anything it does not list.
        merged = {f.name: f.default for f in dataclasses.fields(config_cls) if f.init}
        merged.update(saved_options(config_cls, given.get("output"), command, names))
        given = locate_models(given)  # the run recorded the snapshot directory
        changed = sorted(
            name
            for name, value in given.items()
            if not changeable_on_resume(name) and value != merged[name]
        )
        if changed:
            was = ", ".join(f"{flag_name(n)} {merged[n]!r} (given {given[n]!r})" for n in changed)
            raise UserError(
                f"{given['output']}: a resumed run keeps its settings; it was trained with {was}. "
                "Only steps, save and evaluation cadence, the backend and the trackers may change"
            )
    merged.update(given)
    config = config_cls(**merged)  # bounds are checked before anything is downloaded
    located = locate_models({n: getattr(config, n) for n in MODEL_OPTIONS if n in names})
    for name, value in located.items():
        setattr(config, name, value)
    return config


def saved_options(config_cls, output: str | None, command: str, names: set[str]) -> dict:
    """The options a run directory's config.yaml records (see `RunDir.open`)."""
    if not output:
        raise UserError("--resume needs --output: the run directory to continue")
    path = os.path.join(output, "config.yaml")
    if not os.path.isfile(path):
        raise UserError(f"{output}: no run to resume (no config.yaml)")
    saved = read_yaml(path, None, label="run config")
    if saved.get("command", command) != command:
        raise UserError(f"{output}: holds a {saved['command']} run, not {command}")
    return {
        name: coerce(config_cls, name, value, path)
        for name, value in saved.items()
        if name in names
    }


def coerce(config_cls, name: str, value, source: str):
    """YAML 1.1 reads `1e-4` as a string: convert to the field's type, or say what is wrong."""
    f = next(f for f in dataclasses.fields(config_cls) if f.name == name)
    kind = _click_type(f, typing.get_type_hints(config_cls))
    if value is None or isinstance(kind, click.Choice) and value in kind.choices:
        return value
    if isinstance(kind, click.Choice):
        raise UserError(
            f"{source}: {name} must be one of {', '.join(map(str, kind.choices))}, got {value!r}"
        )
    try:
        if kind is bool and not isinstance(value, bool):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: {name} must be a {kind.__name__}, got {value!r}") from None


def read_yaml(path: str, names: set[str] | None, label: str = "config file") -> dict:
    """A YAML mapping of options; with `names`, any other key is an error."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: {label} not found")
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({yaml_problem(err)})") from err
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read {label} ({err})") from err
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: expected a mapping of option: value")
    loaded = {k.replace("-", "_"): v for k, v in loaded.items()}
    unknown = sorted(set(loaded) - names) if names is not None else []
    if unknown:
        raise UserError(f"{path}: unknown option(s) {', '.join(unknown)}")
    return loaded


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line: the problem and where."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return f"{where}{problem}"


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
