"""The run directory: config.yaml, metrics.jsonl, checkpoints/step-N/, final/, summary.json.

Every file is written so that a crash or Ctrl-C never leaves a half-written
one: whole files go to a temporary name and are renamed (the temporary file is
removed if the write is cut short); a checkpoint directory is assembled under a
hidden name and renamed into place; metrics are appended one complete line at a
time and flushed.

Nothing is written until `open` is called, once the model and data have
loaded, so a start that fails on bad input leaves no directory behind.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import numpy as np
import yaml

from mlxpost.errors import UserError

CHECKPOINT = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"  # written last: a checkpoint without it is incomplete


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included: the old file stays, no .tmp is left
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def json_safe(value):
    """JSON has no inf/nan: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


class RunDir:
    """A run directory. The constructor only checks (unless told not to); `open` creates or
    reopens it."""

    def __init__(self, path: str, resume: bool, check: bool = True):
        self.path = path
        self.resume = resume
        self.metrics_path = os.path.join(path, "metrics.jsonl")
        self.created: list[str] = []  # what `open` made, removed by `discard`
        if not check:  # a data-parallel run's other ranks: rank 0 alone reads and writes it
            return
        if os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f"--output {path}: is a file, not a directory")
        if not resume and os.path.isdir(path) and os.listdir(path):
            raise UserError(
                f"{path}: already holds a run; pass --resume to continue it or choose another --output"
            )
        if resume and not os.path.isfile(os.path.join(path, "config.yaml")):
            raise UserError(f"{path}: no run to resume (no config.yaml)")

    def open(self, config: dict) -> None:
        """Create (or reopen) the directory and write config.yaml."""
        if not os.path.isdir(self.path):
            self.created.append(self.path)
        checkpoints = os.path.join(self.path, "checkpoints")
        if not os.path.isdir(checkpoints):
            self.created.append(checkpoints)
        try:
            os.makedirs(checkpoints, exist_ok=True)
        except OSError as err:
            raise UserError(f"--output {self.path}: cannot create it ({err.strerror})") from err
        if not self.resume:
            self.created.append(os.path.join(self.path, "config.yaml"))
        self.write_config(config)

    def discard(self) -> None:
        """Remove what `open` created for a fresh run that trained no step: the same command
        can then start again. A resumed run's directory is never touched."""
        if self.resume:
            return
        for path in reversed(self.created):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.remove(path)
        if os.path.isfile(self.metrics_path):
            os.remove(self.metrics_path)
        self.created = []

    def write_config(self, config: dict) -> None:
        atomic_write_text(
            os.path.join(self.path, "config.yaml"), yaml.safe_dump(config, sort_keys=False)
        )

    def log(self, metrics: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(json_safe(metrics)) + "\n")
            f.flush()

    def metrics(self) -> list[dict]:
        if not os.path.isfile(self.metrics_path):
            return []
        rows = []
        with open(self.metrics_path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a crash ends the log
        return rows

    def truncate_metrics(self, step: int | None) -> None:
        """Keep the log up to `step`, the checkpoint a resumed run restarts from
        (None: no checkpoint, the run starts again from nothing)."""
        if step is None:
            if os.path.isfile(self.metrics_path):
                os.remove(self.metrics_path)
            return
        kept = [row for row in self.metrics() if row.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(row) + "\n" for row in kept))

    # ---- checkpoints ----
    def checkpoint_dir(self, step: int) -> str:
        return os.path.join(self.path, "checkpoints", f"step-{step}")

    def latest_checkpoint(self) -> tuple[int, str] | None:
        """The complete checkpoint with the highest step, final/ included."""
        root = os.path.join(self.path, "checkpoints")
        found = []
        for name in os.listdir(root) if os.path.isdir(root) else []:
            match = CHECKPOINT.match(name)
            if match and os.path.isfile(os.path.join(root, name, STATE_FILE)):
                found.append((int(match.group(1)), os.path.join(root, name)))
        final = os.path.join(self.path, "final", STATE_FILE)
        if os.path.isfile(final):
            with open(final) as f:
                found.append((int(json.load(f)["step"]), os.path.dirname(final)))
        return max(found) if found else None

    def begin_checkpoint(self, name: str) -> str:
        """A hidden staging directory; `commit_checkpoint` moves it into place."""
        staging = os.path.join(self.path, f".{name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        return staging

    def commit_checkpoint(self, staging: str, target: str, state: dict) -> None:
        atomic_write_text(os.path.join(staging, STATE_FILE), json.dumps(state, indent=2))
        if os.path.isdir(target):
            old = target + ".old"
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old)
        else:
            os.replace(staging, target)

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(
            os.path.join(self.path, "summary.json"), json.dumps(summary, indent=2) + "\n"
        )


def save_arrays(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_arrays(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}
