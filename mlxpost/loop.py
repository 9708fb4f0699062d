"""The loop every training command shares: setup, steps, evaluation, checkpoints, resume.

An algorithm supplies `train_step(step) -> metrics` and `evaluate(step) -> metrics`
(and optionally `state()` / `load_state()` for its own extra state). Everything
it draws at a step (data order, dropout, sampling) is seeded from (seed, step),
so a resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Protocol

from safetensors.numpy import save_file
from tqdm import tqdm

from mlxpost import assets
from mlxpost.backend import Backend, LoraConfig, OptimConfig, get_backend
from mlxpost.checkpoint import max_positions, read_config
from mlxpost.config import TrainConfig, default_output, to_dict
from mlxpost.errors import UserError
from mlxpost.run import RunDir, load_arrays, save_arrays
from mlxpost.tokenizer import TokenizerInfo, load_tokenizer

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


class Algorithm(Protocol):
    def train_step(self, step: int) -> dict[str, float]: ...
    def evaluate(self, step: int) -> dict[str, float]: ...


@dataclass
class Session:
    """What an algorithm trains with: the resolved config, backend, model and run directory."""

    command: str
    cfg: TrainConfig
    backend: Backend
    model: Any
    info: TokenizerInfo
    optimizer: Any
    run: RunDir
    start_step: int = 0

    def say(self, message: str) -> None:
        tqdm.write(message, file=sys.stderr)


def setup(command: str, cfg: TrainConfig, scalar_head: bool = False) -> Session:
    """Validate input, create (or reopen) the run directory, load and prepare the model."""
    cfg.model = cfg.model or assets.default_model()
    cfg.output = cfg.output or default_output(command)
    limit = max_positions(read_config(cfg.model))  # bad input fails before a backend is imported
    if limit and cfg.max_length > limit:
        cfg.max_length = limit  # the model cannot see further
    run = RunDir(cfg.output, cfg.resume)
    if cfg.resume:
        previous = run.read_config()
        if previous and previous.get("model") != cfg.model:
            raise UserError(
                f"{cfg.output}: was trained from {previous.get('model')}, not {cfg.model}"
            )
    run.write_config({"command": command, **to_dict(cfg)})

    backend = get_backend(cfg.backend)
    backend.seed(cfg.seed)
    model = backend.load_model(cfg.model, cfg.dtype)
    if scalar_head:
        backend.attach_scalar_head(model, seed=cfg.seed)
    if cfg.lora:
        lora = LoraConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_list())
        backend.attach_lora(model, lora, seed=cfg.seed)
    optimizer = backend.make_optimizer(
        model,
        OptimConfig(
            learning_rate=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm or None,
            warmup_steps=cfg.warmup_steps,
            total_steps=cfg.steps,
            min_lr_ratio=cfg.min_lr_ratio,
        ),
    )
    session = Session(command, cfg, backend, model, load_tokenizer(cfg.model), optimizer, run)
    trainable, total = backend.parameter_count(model)
    mode = f"LoRA r={cfg.lora_rank}" if cfg.lora else "full fine-tuning"
    session.say(
        f"{command}: {backend.describe()}, {mode}; trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
    )
    session.say(f"run directory: {cfg.output}")
    return session


def save_checkpoint(session: Session, algorithm, step: int, final: bool = False) -> str:
    """Trainable weights, optimizer state and the algorithm's state, committed atomically."""
    run, backend, model = session.run, session.backend, session.model
    target = os.path.join(run.path, "final") if final else run.checkpoint_dir(step)
    staging = run.begin_checkpoint(os.path.basename(target))
    save_arrays(
        os.path.join(staging, "trainable.npz"), backend.parameters(model, trainable_only=True)
    )
    save_arrays(
        os.path.join(staging, "optimizer.npz"),
        {k: v for k, v in backend.optimizer_state(session.optimizer).items() if k != "step"},
    )
    if hasattr(algorithm, "state"):
        with open(os.path.join(staging, "algorithm.json"), "w") as f:
            json.dump(algorithm.state(), f)
    export_model(session, staging)
    if hasattr(algorithm, "export"):  # extra files an algorithm's users need (reward_model.json)
        algorithm.export(staging)
    run.commit_checkpoint(
        staging,
        target,
        {"step": step, "optimizer_step": backend.optimizer_state(session.optimizer)["step"]},
    )
    return target


def export_model(session: Session, directory: str) -> None:
    """What users load: a PEFT adapter (LoRA) or a Hugging Face checkpoint (full), with tokenizer."""
    backend, model, cfg = session.backend, session.model, session.cfg
    if cfg.lora:
        backend.save_adapter(model, directory)
        return
    weights = {k: v for k, v in backend.parameters(model).items() if not k.startswith("score.")}
    save_file(weights, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(cfg.model, "config.json"), directory)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(cfg.model, name)):
            shutil.copy(os.path.join(cfg.model, name), directory)


def restore(session: Session, algorithm) -> int:
    """Load the newest checkpoint of the run directory; returns the step to continue from."""
    found = session.run.latest_checkpoint()
    if found is None:
        session.say(f"{session.run.path}: no checkpoint yet, starting from step 0")
        return 0
    step, path = found
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    backend = session.backend
    backend.set_parameters(session.model, load_arrays(os.path.join(path, "trainable.npz")))
    optimizer_state = load_arrays(os.path.join(path, "optimizer.npz"))
    backend.load_optimizer_state(
        session.optimizer, {"step": state["optimizer_step"], **optimizer_state}
    )
    if hasattr(algorithm, "load_state") and os.path.isfile(os.path.join(path, "algorithm.json")):
        with open(os.path.join(path, "algorithm.json")) as f:
            algorithm.load_state(json.load(f))
    session.run.truncate_metrics(step)
    session.say(f"resuming from {path}")
    return step


def train(session: Session, algorithm: Algorithm) -> dict:
    """Run steps [start, cfg.steps), evaluating and checkpointing on the configured cadence."""
    cfg, run = session.cfg, session.run
    start = restore(session, algorithm) if cfg.resume else 0
    if start >= cfg.steps:
        raise UserError(
            f"{cfg.output}: already trained for {start} steps; raise --steps to continue"
        )
    if start == 0:
        first = algorithm.evaluate(0)
        if first:
            run.log({"step": 0, **first})
            session.say(format_metrics("eval step 0", first))
    last_eval: dict = {}
    train_seconds, tokens = 0.0, 0.0
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc=session.command,
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
    )
    step = start
    try:
        for step in range(start, cfg.steps):
            began = time.perf_counter()
            metrics = algorithm.train_step(step)
            seconds = time.perf_counter() - began
            train_seconds += seconds  # evaluation time is not training speed
            metrics["step_seconds"] = seconds
            tokens += metrics.get("tokens", 0.0)
            metrics["tokens_per_second"] = tokens / max(train_seconds, 1e-9)
            record = {"step": step + 1, **metrics}
            done = step + 1
            if cfg.eval_every and done % cfg.eval_every == 0 or done == cfg.steps:
                last_eval = algorithm.evaluate(done)
                record.update(last_eval)
                session.say(format_metrics(f"eval step {done}", last_eval))
            run.log(record)
            bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_second']:.0f}"
            )
            bar.update(1)
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                save_checkpoint(session, algorithm, done)
    except KeyboardInterrupt:
        bar.close()
        latest = run.latest_checkpoint()
        where = f"checkpoint step {latest[0]}" if latest else "no checkpoint yet"
        session.say(
            f"interrupted at step {step}; {where}; continue with --resume --output {cfg.output}"
        )
        sys.exit(130)
    bar.close()
    final = save_checkpoint(session, algorithm, cfg.steps, final=True)
    summary = {
        "command": session.command,
        "steps": cfg.steps,
        "final": final,
        **{k: v for k, v in record.items() if k != "step"},
    }
    run.write_summary(summary)
    session.say(f"done: {final}")
    return summary


def format_metrics(label: str, metrics: dict) -> str:
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
    return f"{label}: {shown}"
