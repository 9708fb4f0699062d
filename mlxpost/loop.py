"""The loop every training command shares: setup, steps, evaluation, checkpoints, resume.

An algorithm subclasses `Algorithm`: `train_step(step) -> metrics`,
`evaluate(step) -> metrics` and, if its users need more than the model in a
checkpoint, `export(directory)`. Everything it draws at a step (data order,
dropout, sampling) is seeded from (seed, step), so a resumed run repeats exactly
what an uninterrupted one would have done.

Each metrics row goes to the run's metrics.jsonl and to the trackers of `--report-to`
(mlxpost.trackers). The progress bar on stderr shows the step, loss, the command's
headline metric, tokens/s, peak memory and the ETA; when training ends, one summary says
how the held-out figures moved and where the run and its curves are.

The loop raises and never exits: `NonFiniteError` when steps keep producing
NaN or inf (no non-finite checkpoint is ever written), `Interrupted` on Ctrl-C;
the command layer maps them to exit statuses 3 and 130.

Started by torchrun or mlx.launch, every rank runs this loop on its share of each
step's batch (mlxpost.distributed); rank 0 alone evaluates and writes the run
directory, the progress bar and the trackers, with the step's metrics reduced over
the ranks. A resumed run's state goes from rank 0 to every rank, so a run resumes
on any number of ranks.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from functools import cached_property
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from mlxpost import assets, distributed
from mlxpost.backend import Backend, get_backend
from mlxpost.backend_shared.training import process_peak_memory_gb
from mlxpost.config import TrainConfig, default_output, to_dict
from mlxpost.errors import Interrupted, NonFiniteError, UserError
from mlxpost.model_dir import max_positions, read_config
from mlxpost.run import RunDir, load_arrays, save_arrays
from mlxpost.tokenizer import TokenizerInfo, load_tokenizer
from mlxpost.trackers import Reporter, Tracker, make_trackers, parse_report_to

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


class Algorithm:
    """What the loop drives. `train_step` returns the step's metrics, with the
    backend's `nonfinite_updates` (updates skipped on NaN/inf) summed over its updates."""

    def train_step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out figures at `step` (0: before training); none by default."""
        return {}

    def export(self, directory: str) -> None:
        """Files besides the model that users of a checkpoint need (none by default)."""


class Session:
    """What an algorithm trains with: the resolved config, tokenizer, run directory and, on
    first use, the backend, model and optimizer.

    The model loads when an algorithm first asks for it, so an algorithm that reads its
    data first reports bad data before a framework is imported or a model loaded."""

    def __init__(
        self,
        command: str,
        cfg: TrainConfig,
        info: TokenizerInfo,
        run: RunDir,
        scalar_head: bool = False,
        trackers: list[Tracker] | None = None,
    ):
        self.command, self.cfg, self.info, self.run = command, cfg, info, run
        self.scalar_head = scalar_head
        self.reporter = Reporter(trackers or (), self.say)

    def say(self, message: str) -> None:
        if distributed.is_main_process():
            tqdm.write(message, file=sys.stderr)

    @cached_property
    def backend(self) -> Backend:
        backend = get_backend(self.cfg.backend)
        world = distributed.init(backend.name)
        if world.size > 1:
            self.say(
                f"data-parallel over {world.size} ranks ({distributed.LAUNCHER_OF[backend.name]})"
            )
        backend.seed(self.cfg.seed)
        return backend

    @cached_property
    def model(self) -> Any:
        """The model, with the scalar head and the LoRA adapter the config asks for."""
        cfg, backend = self.cfg, self.backend
        model = backend.load_model(cfg.model, cfg.dtype, quantize=cfg.quantize)
        if self.scalar_head:
            backend.attach_scalar_head(model, seed=cfg.seed)
        if cfg.lora:
            backend.attach_lora(model, cfg.lora_config(), seed=cfg.seed)
        if cfg.grad_checkpoint:
            backend.set_grad_checkpoint(model, True)
        world = distributed.world()
        world.sharded = bool(cfg.fsdp and world.size > 1)
        if world.sharded:
            backend.shard_weights(model)
            self.say(f"fsdp: each of the {world.size} ranks holds its share of the weights")
        elif cfg.fsdp:
            self.say("--fsdp: one process, nothing to shard")
        backend.set_logits_chunk(model, cfg.logits_chunk)
        trainable, total = backend.parameter_count(model)
        mode = f"LoRA r={cfg.lora_rank}" if cfg.lora else "full fine-tuning"
        if cfg.quantize:
            mode += f" on a {cfg.quantize}-bit base"
        self.say(
            f"{self.command}: {backend.describe()}, {mode}; trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
        )
        return model

    @cached_property
    def optimizer(self) -> Any:
        return self.backend.make_optimizer(self.model, self.cfg.optim_config())

    def load(self) -> None:
        """Load the model and make the optimizer now, if the algorithm has not needed them yet."""
        self.optimizer  # noqa: B018  (a cached property: reading it loads)


def setup(command: str, cfg: TrainConfig, scalar_head: bool = False) -> Session:
    """Validate the model directory and --output, load the tokenizer and import the trackers'
    libraries; nothing is written and no framework is imported yet (see Session)."""
    cfg.model = cfg.model or assets.default_model()
    cfg.output = cfg.output or default_output(command)
    limit = max_positions(read_config(cfg.model))  # bad input fails before a backend is imported
    if limit and cfg.max_length > limit:
        cfg.max_length = limit  # the model cannot see further
    main = distributed.is_main_process()  # the other ranks of a data-parallel run write nothing
    run = RunDir(cfg.output, cfg.resume, check=main)  # nothing is written before `train`
    latest = run.latest_checkpoint() if cfg.resume and main else None
    if latest is not None and latest[0] >= cfg.steps:
        raise UserError(
            f"{cfg.output}: already trained for {latest[0]} steps; raise --steps to continue"
        )
    trackers = make_trackers(parse_report_to(cfg.report_to), cfg.wandb_project) if main else []
    return Session(command, cfg, load_tokenizer(cfg.model), run, scalar_head, trackers)


def save_checkpoint(session: Session, algorithm: Algorithm, step: int, final: bool = False) -> str:
    """Trainable weights and optimizer state, committed atomically; refused if any is not finite.
    Every rank reads them (their state is the same, so all stop together; a sharded model's
    are gathered from every rank); rank 0 writes."""
    run, backend, model = session.run, session.backend, session.model
    target = os.path.join(run.path, "final") if final else run.checkpoint_dir(step)
    trainable = backend.parameters(model, trainable_only=True)
    optimizer = backend.optimizer_state(session.optimizer)
    moments = {k: v for k, v in optimizer.items() if k != "step"}
    bad = next((k for k, v in {**trainable, **moments}.items() if not np.all(np.isfinite(v))), None)
    if bad is not None:
        latest = run.latest_checkpoint() if distributed.world().is_main else None
        raise NonFiniteError(
            f"step {step}: {bad} holds NaN or inf; no checkpoint written "
            f"(newest: {latest[1] if latest else 'none'})"
        )
    if not distributed.world().is_main:
        return target
    staging = run.begin_checkpoint(os.path.basename(target))
    try:
        save_arrays(os.path.join(staging, "trainable.npz"), trainable)
        save_arrays(os.path.join(staging, "optimizer.npz"), moments)
        export_model(session, staging, trainable)
        algorithm.export(staging)
        run.commit_checkpoint(staging, target, {"step": step, "optimizer_step": optimizer["step"]})
    except BaseException:  # a cut-short checkpoint leaves no staging directory behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def export_model(session: Session, directory: str, trainable: dict) -> None:
    """What users load: a PEFT adapter (LoRA) or a Hugging Face checkpoint (full: the
    `trainable` parameters, which then are all of them; read once by every rank, so a sharded
    model is gathered once), with tokenizer."""
    backend, model, cfg = session.backend, session.model, session.cfg
    if cfg.lora:
        backend.save_adapter(model, directory)
        return
    weights = {k: v for k, v in trainable.items() if not k.startswith("score.")}
    save_file(weights, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(cfg.model, "config.json"), directory)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(cfg.model, name)):
            shutil.copy(os.path.join(cfg.model, name), directory)


def restore(session: Session) -> int | None:
    """Load the newest checkpoint of the run directory into the model and optimizer; returns
    its step, or None when the run has none yet. Reads only: nothing is written. In a
    data-parallel run rank 0 reads and sends the state to the others (which need not see
    the run directory); every rank then loads it (a sharded model's rank its own share)."""
    world, backend = distributed.world(), session.backend
    # Every rank: a sharded model's parameters are gathered, which takes all of them.
    expected = backend.parameters(session.model, trainable_only=True)
    found = read_checkpoint(session, expected) if world.is_main else None
    if world.size > 1:
        found = broadcast_checkpoint(found, expected)
    if found is None:
        return None
    step, trainable, optimizer_state = found
    backend.set_parameters(session.model, trainable)
    backend.load_optimizer_state(session.optimizer, optimizer_state)
    return step


def broadcast_checkpoint(found: tuple | None, expected: dict) -> tuple | None:
    """Rank 0's checkpoint (step, trainable weights, optimizer state) on every rank; the
    others pass None and learn the arrays' shapes from `expected`."""
    world = distributed.world()
    step = int(world.broadcast(-1 if found is None else found[0]))
    if step < 0:
        return None
    _, trainable, state = found if world.is_main else (step, {}, {})
    names = sorted(k for k in state if k != "step" and k.split(".", 1)[-1] in expected)
    slots = world.all_gather(names if world.is_main else None)
    optimizer_step = int(world.broadcast(state.get("step", 0)))

    def sent(name: str, mine: dict, shape_of: str) -> np.ndarray:
        value = mine[name] if world.is_main else np.zeros_like(expected[shape_of])
        return world.broadcast(value).astype(expected[shape_of].dtype)

    trainable = {name: sent(name, trainable, name) for name in expected}
    moments = {key: sent(key, state, key.split(".", 1)[1]) for key in slots[0]}
    return step, trainable, {"step": optimizer_step, **moments}


def read_checkpoint(session: Session, expected: dict) -> tuple | None:
    """The newest checkpoint's (step, trainable weights, optimizer state), checked against
    the run's model (`expected`: its trainable parameters); None when there is none."""
    found = session.run.latest_checkpoint()
    if found is None:
        return None
    step, path = found
    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        trainable = load_arrays(os.path.join(path, "trainable.npz"))
        optimizer_state = load_arrays(os.path.join(path, "optimizer.npz"))
        optimizer_step = int(state["optimizer_step"])
    except Exception as err:  # a cut or garbled file fails in many ways (zip, JSON, npy)
        raise UserError(
            f"{path}: checkpoint is unreadable ({type(err).__name__}: {err}); "
            "remove it to resume from the one before"
        ) from err
    if set(trainable) != set(expected) or any(
        trainable[k].shape != expected[k].shape for k in expected
    ):
        raise UserError(f"{path}: checkpoint does not match the run's model and adapter")
    session.say(f"resuming from {path}")
    return step, trainable, {"step": optimizer_step, **optimizer_state}


def train(session: Session, algorithm: Algorithm) -> dict:
    """Run steps [start, cfg.steps), evaluating and checkpointing on the configured cadence.

    The run directory is written from here on. If a fresh run ends (error or Ctrl-C)
    before its first step is logged, what it wrote is removed, so the same command
    can start again."""
    cfg, run = session.cfg, session.run
    session.load()
    start = restore(session) if cfg.resume else None
    main = distributed.world().is_main
    if main:
        run.open({"command": session.command, **to_dict(cfg)})
    session.say(f"run directory: {cfg.output}")
    if cfg.resume and main:
        run.truncate_metrics(start)  # rows past the checkpoint are logged again
        if start is None:
            session.say(f"{run.path}: no checkpoint yet, starting from step 0")
    progress = Progress(session, start or 0)
    reporter = session.reporter
    try:
        reporter.start(run.path, {"command": session.command, **to_dict(cfg)})
        summary = progress.run(algorithm)
    except BaseException as err:
        reporter.finish({}, failed=True)  # before a discard removes the trackers' files
        if progress.done == (start or 0) and not cfg.resume and main:
            run.discard()  # nothing was trained: leave no half-made run behind
        if isinstance(err, KeyboardInterrupt):
            raise Interrupted(progress.interrupted_message()) from None
        if isinstance(err, distributed.PeerLost):
            raise distributed.PeerLost(f"{err}; {progress.resume_hint()}") from None
        raise
    reporter.finish(summary)
    for line in progress.closing_lines(summary):
        session.say(line)
    return summary


class Progress:
    """The step loop of `train`: metrics, evaluation and checkpoint cadence, the progress
    bar, and the count of consecutive steps skipped on non-finite values."""

    def __init__(self, session: Session, start: int):
        self.session, self.start, self.done = session, start, start
        self.nonfinite_in_a_row = 0
        self.eval_keys: list[str] = []  # what the algorithm's evaluations report
        self.peak_memory_gb: float | None = None

    def log(self, row: dict) -> None:
        """One metrics row: metrics.jsonl, then the trackers (rank 0 only)."""
        if distributed.world().is_main:
            self.session.run.log(row)
            self.session.reporter.log(row)

    def evaluate(self, algorithm: Algorithm, step: int) -> dict:
        """Held-out figures, measured by rank 0 alone (the others wait at the next step); by
        every rank when the model is sharded (its passes need all of them), rank 0's kept."""
        world = distributed.world()
        if not world.is_main and not world.sharded:
            return {}
        figures = algorithm.evaluate(step)
        if not world.is_main:
            return {}
        self.eval_keys += [k for k in figures if k not in self.eval_keys]
        return figures

    def run(self, algorithm: Algorithm) -> dict:
        session, cfg = self.session, self.session.cfg
        if self.start == 0:
            first = self.evaluate(algorithm, 0)
            if first:
                self.log({"step": 0, **first})
                session.say(format_metrics("eval step 0", first))
        train_seconds, tokens = 0.0, 0.0
        record: dict = {}
        with tqdm(
            total=cfg.steps,
            initial=self.start,
            desc=session.command,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not distributed.world().is_main,
        ) as bar:
            for step in range(self.start, cfg.steps):
                began = time.perf_counter()
                metrics = distributed.reduce_metrics(algorithm.train_step(step))
                seconds = time.perf_counter() - began
                train_seconds += seconds  # evaluation time is not training speed
                metrics["step_seconds"] = seconds
                peak = session.backend.peak_memory_gb()
                if peak is not None:
                    metrics["peak_memory_gb"] = peak
                tokens += metrics.get("tokens", 0.0)
                metrics["tokens_per_second"] = tokens / max(train_seconds, 1e-9)
                record = {"step": step + 1, **metrics}
                done = step + 1
                if cfg.eval_every and done % cfg.eval_every == 0 or done == cfg.steps:
                    last_eval = self.evaluate(algorithm, done)
                    record.update(last_eval)
                    if last_eval:
                        session.say(format_metrics(f"eval step {done}", last_eval))
                self.log(record)
                self.done = done
                bar.set_postfix(self.postfix(metrics), refresh=False)
                bar.update(1)
                self.check_finite(done, metrics)
                if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                    save_checkpoint(session, algorithm, done)
        final = save_checkpoint(session, algorithm, cfg.steps, final=True)
        summary = {
            "command": session.command,
            "steps": cfg.steps,
            "final": final,
            **{k: v for k, v in record.items() if k != "step"},
        }
        if distributed.world().is_main:
            session.run.write_summary(summary)
        return summary

    def postfix(self, metrics: dict) -> dict[str, str]:
        """The progress bar's figures after the step count: loss, the headline metric,
        tokens/s and peak memory (tqdm adds the ETA)."""
        shown = {"loss": f"{metrics['loss']:.4f}"}
        headline = next((k for k in STEP_HEADLINES if is_number(metrics.get(k))), None)
        if headline:
            shown[headline] = f"{metrics[headline]:.3f}"
        shown["tok/s"] = f"{metrics['tokens_per_second']:.0f}"
        peak = peak_memory_gb(metrics)
        if peak is not None:
            self.peak_memory_gb = max(peak, self.peak_memory_gb or 0.0)
            shown["mem"] = f"{self.peak_memory_gb:.2f}G"
        return shown

    def closing_lines(self, summary: dict) -> list[str]:
        """What training achieved and where to look: the held-out headline figures from the
        first evaluation in metrics.jsonl to the last, the run directory, how to plot it."""
        session, cfg = self.session, self.session.cfg
        if not distributed.world().is_main:
            return []
        rows = session.run.metrics()
        moved = []
        for key in [k for k in EVAL_HEADLINES if k in self.eval_keys][:2] or self.eval_keys[:1]:
            points = [(row["step"], row[key]) for row in rows if is_number(row.get(key))]
            if len(points) > 1:
                moved.append(
                    f"{key} {points[0][1]:.4g} -> {points[-1][1]:.4g} "
                    f"(step {points[0][0]} -> {points[-1][0]})"
                )
            elif points:
                moved.append(f"{key} {points[0][1]:.4g} (step {points[0][0]})")
        figures = f"; held-out {', '.join(moved)}" if moved else ""
        memory = f"; peak memory {self.peak_memory_gb:.2f} GB" if self.peak_memory_gb else ""
        look = [f"curves: mlxpost plot {cfg.output}", *session.reporter.where()]
        return [
            f"{session.command} done at step {cfg.steps}{figures}{memory}",
            f"run directory {cfg.output} (trained model: {summary['final']}); {'; '.join(look)}",
        ]

    def check_finite(self, done: int, metrics: dict) -> None:
        """Stop after --max-nonfinite-steps steps in a row that skipped an update."""
        skipped = metrics.get("nonfinite_updates", 0.0)
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if skipped else 0
        if skipped:
            self.session.say(f"step {done}: loss or gradient norm is NaN or inf; update skipped")
        limit = self.session.cfg.max_nonfinite_steps
        if self.nonfinite_in_a_row >= limit:
            latest = self.session.run.latest_checkpoint() if distributed.world().is_main else None
            raise NonFiniteError(
                f"step {done}: loss or gradient norm NaN or inf for {limit} steps in a row "
                f"(steps {done - limit + 1}-{done}), updates skipped; newest checkpoint: "
                f"{latest[1] if latest else 'none'}; try a lower --learning-rate"
            )

    def interrupted_message(self) -> str:
        cfg = self.session.cfg
        if self.done == self.start and not cfg.resume:
            return f"interrupted before step {self.start + 1}; nothing was kept in {cfg.output}"
        return f"interrupted after step {self.done}; {self.resume_hint()}"

    def resume_hint(self) -> str:
        cfg = self.session.cfg
        latest = self.session.run.latest_checkpoint() if distributed.world().is_main else None
        where = f"newest checkpoint: step {latest[0]}" if latest else "no checkpoint yet"
        if not distributed.world().is_main:
            where = "rank 0 reports the newest checkpoint"
        return (
            f"{where}; continue with: mlxpost {self.session.command} --resume --output {cfg.output}"
        )


# The step metric the progress bar shows next to the loss, the first a command reports:
# GRPO's mean reward, PPO's mean score, the preference accuracy of rm and dpo.
STEP_HEADLINES = ("reward", "score", "accuracy")
# The held-out figures the closing summary follows (at most two, in this order).
EVAL_HEADLINES = ("math_accuracy", "eval_accuracy", "eval_rm_score", "eval_loss")


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def peak_memory_gb(metrics: dict) -> float | None:
    """The backend's `peak_memory_gb` metric if it reports one, else the process's resident
    high-water mark (None where the platform has no getrusage)."""
    if is_number(metrics.get("peak_memory_gb")):
        return float(metrics["peak_memory_gb"])
    return process_peak_memory_gb()


def format_metrics(label: str, metrics: dict) -> str:
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
    return f"{label}: {shown}"
