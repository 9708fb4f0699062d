"""Experiment trackers (`--report-to`): the rows of metrics.jsonl, also sent to TensorBoard or
Weights & Biases.

metrics.jsonl stays the record; a tracker gets the same rows (training steps and
evaluations alike), numbers only: booleans, strings and NaN/inf (null in metrics.jsonl) are
left out. Each tracker imports its library only when asked for, so a missing one is a
`UserError` naming the package to install, raised before any model is loaded.

- tensorboard: event files under `<run>/tensorboard/`, written with the `tensorboard`
  package's own event writer (no torch or TensorFlow needed). Scalars are float32, as
  TensorBoard stores them. Each training session starts with a restart marker at its first
  step, so TensorBoard drops what an interrupted session logged past the checkpoint a
  resumed run restarts from.
- wandb: a run under `<run>/wandb/`, project `--wandb-project` (else $WANDB_PROJECT, else
  "mlxpost"). WANDB_MODE is respected when set; otherwise the run is offline unless
  WANDB_API_KEY is set (upload an offline run later with `wandb sync DIR`). A resumed
  training run starts a new W&B run of the same name.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable

from mlxpost.errors import UserError, first_line

NONE = "none"


def parse_report_to(value: str | None) -> tuple[str, ...]:
    """`--report-to`'s comma-separated names, checked; () for none."""
    names: list[str] = []
    for name in (part.strip().lower() for part in (value or "").split(",")):
        if not name:
            continue
        if name != NONE and name not in TRACKERS:
            raise UserError(
                f"--report-to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)} or {NONE}"
            )
        if name not in names:
            names.append(name)
    if NONE in names and len(names) > 1:
        raise UserError(f"--report-to: {NONE} cannot be combined with {', '.join(names[1:])}")
    return tuple(n for n in names if n != NONE)


def numeric(row: dict) -> dict[str, float]:
    """The finite numbers of a metrics row (what metrics.jsonl holds as numbers)."""
    return {
        key: float(value)
        for key, value in row.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


def missing_library(tracker: str, package: str, err: BaseException) -> UserError:
    if isinstance(err, ImportError):
        return UserError(
            f"--report-to {tracker}: the {package} package is not installed; pip install {package}"
        )
    return UserError(f"--report-to {tracker}: {package} failed to import ({first_line(err)})")


class Tracker:
    """One destination for metrics rows; `start` once, `log` per row, `finish` once."""

    name = ""

    def start(self, run_dir: str, config: dict) -> None:
        raise NotImplementedError

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self, summary: dict, failed: bool = False) -> None:
        """Close; `failed` when training ended early (error or Ctrl-C)."""

    def where(self) -> str:
        """How to look at what was logged, for the end-of-training message."""
        return ""


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self):
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except Exception as err:  # a broken install fails in other ways than ImportError
            raise missing_library(self.name, "tensorboard", err) from err
        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        self._writer_cls = EventFileWriter
        self._writer = None
        self._logdir = ""
        self._restarted = False

    def start(self, run_dir: str, config: dict) -> None:
        self._logdir = os.path.join(run_dir, "tensorboard")
        self._writer = self._writer_cls(self._logdir, flush_secs=10)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        event_pb2, summary_pb2 = self._event_pb2, self._summary_pb2
        now = time.time()
        if not self._restarted:
            # TensorBoard forgets events at this step and later from earlier sessions.
            self._writer.add_event(
                event_pb2.Event(
                    wall_time=now,
                    step=step,
                    session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
                )
            )
            self._restarted = True
        values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()]
        self._writer.add_event(
            event_pb2.Event(wall_time=now, step=step, summary=summary_pb2.Summary(value=values))
        )
        self._writer.flush()  # a TensorBoard watching the run sees each step

    def finish(self, summary: dict, failed: bool = False) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def where(self) -> str:
        return f"tensorboard --logdir {self._logdir}"


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, project: str | None = None):
        try:
            import wandb
        except Exception as err:
            raise missing_library(self.name, "wandb", err) from err
        self._wandb = wandb
        self.project = project or os.environ.get("WANDB_PROJECT") or "mlxpost"
        self._run = None
        self._where = ""

    def start(self, run_dir: str, config: dict) -> None:
        # WANDB_MODE as the user set it; else offline unless there is a key to sync with.
        mode = None  # wandb reads WANDB_MODE itself
        if not os.environ.get("WANDB_MODE"):
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        os.makedirs(run_dir, exist_ok=True)
        try:
            self._run = self._wandb.init(
                project=self.project,
                name=os.path.basename(os.path.normpath(run_dir)),
                job_type=config.get("command"),
                config=config,
                dir=run_dir,
                mode=mode,
            )
        except Exception as err:  # wandb raises its own errors and others
            raise UserError(f"--report-to wandb: cannot start a run ({first_line(err)})") from err

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def finish(self, summary: dict, failed: bool = False) -> None:
        if self._run is None:
            return
        run, self._run = self._run, None
        if not failed:
            run.summary.update(numeric(summary))
        self._where = self._describe(run)
        run.finish(exit_code=1 if failed else 0)

    def _describe(self, run) -> str:
        if getattr(run, "disabled", False):
            return ""
        if getattr(run, "offline", False):
            directory = getattr(run, "sync_dir", None) or os.path.dirname(run.dir)
            return f"wandb sync {directory}"
        return f"wandb {run.url}" if run.url else ""

    def where(self) -> str:
        return self._where


def make_trackers(names: Iterable[str], wandb_project: str | None = None) -> list[Tracker]:
    """One tracker per name, its library imported now (UserError if missing)."""
    made: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            made.append(TensorBoardTracker())
        elif name == "wandb":
            made.append(WandbTracker(wandb_project))
        else:
            raise UserError(f"--report-to: unknown tracker {name!r}")
    return made


class Reporter:
    """Sends each metrics row to every started tracker. A tracker that fails while logging
    is dropped with one warning; the run goes on, and metrics.jsonl keeps the record."""

    def __init__(self, trackers: Iterable[Tracker], say: Callable[[str], None] | None = None):
        self.trackers = list(trackers)
        self.started: list[Tracker] = []
        self.finished: list[Tracker] = []
        self.say = say or (lambda message: print(message, file=sys.stderr))

    def start(self, run_dir: str, config: dict) -> None:
        for tracker in self.trackers:
            tracker.start(run_dir, config)
            self.started.append(tracker)

    def log(self, row: dict) -> None:
        step = row.get("step")
        metrics = numeric({k: v for k, v in row.items() if k != "step"})
        if not isinstance(step, int) or not metrics:
            return
        for tracker in list(self.started):
            try:
                tracker.log(step, metrics)
            except Exception as err:
                self.started.remove(tracker)
                self.say(
                    f"{tracker.name}: stopped logging ({first_line(err)}); metrics.jsonl keeps the record"
                )
                self._close(tracker, {}, failed=True)

    def finish(self, summary: dict, failed: bool = False) -> None:
        """Close every started tracker; never raises (it also runs while an error unwinds)."""
        for tracker in self.started:
            self._close(tracker, summary, failed)
            self.finished.append(tracker)
        self.started = []

    def _close(self, tracker: Tracker, summary: dict, failed: bool) -> None:
        try:
            tracker.finish(summary, failed=failed)
        except Exception as err:
            self.say(f"{tracker.name}: could not close cleanly ({first_line(err)})")

    def where(self) -> list[str]:
        return [w for w in (t.where() for t in self.finished) if w]


TRACKERS = ("tensorboard", "wandb")
