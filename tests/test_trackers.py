"""--report-to: TensorBoard and W&B get metrics.jsonl's rows; the progress bar and the closing
summary of training."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mlxpost.errors import UserError
from mlxpost.trackers import (
    Reporter,
    TensorBoardTracker,
    Tracker,
    make_trackers,
    numeric,
    parse_report_to,
)
from tests.test_cli import assert_user_error

SHORT = ["--steps", "3", "--eval-every", "2"]  # evaluations at steps 0, 2 and 3


def sft_command(model, output, *extra):
    """`mlxpost sft` with the loop tests' FAST options (imported here: that module needs torch)."""
    from tests.test_training import sft_command as command

    return command(model, output, *extra)


def run(args, env=None):
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def metric_rows(output) -> dict[int, dict[str, float]]:
    """metrics.jsonl as {step: its numbers}; an evaluation row and a step row may share a step."""
    rows: dict[int, dict[str, float]] = {}
    with open(os.path.join(output, "metrics.jsonl")) as f:
        for row in map(json.loads, f):
            rows.setdefault(row["step"], {}).update(
                numeric({k: v for k, v in row.items() if k != "step"})
            )
    return rows


# ---- end to end: `mlxpost sft --report-to ...` ----


def test_tensorboard_scalars_equal_metrics_jsonl(tiny_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = run(sft_command(tiny_dir / "tiny-gpt2", out, *SHORT, "--report-to", "tensorboard"))
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)  # stdout holds the summary JSON and nothing else

    expected = metric_rows(out)
    assert sorted(expected) == [0, 1, 2, 3] and "eval_loss" in expected[0]
    assert glob.glob(str(out / "tensorboard" / "events.out.tfevents.*")), "no event file"
    accumulator = EventAccumulator(str(out / "tensorboard"))
    accumulator.Reload()
    scalars: dict[int, dict[str, float]] = {}
    for tag in accumulator.Tags()["scalars"]:
        for point in accumulator.Scalars(tag):
            scalars.setdefault(point.step, {})[tag] = point.value
    assert sorted(scalars) == sorted(expected)
    for step, figures in expected.items():
        assert sorted(scalars[step]) == sorted(figures), step
        for tag, value in figures.items():  # TensorBoard stores float32
            assert scalars[step][tag] == np.float32(value), (step, tag)

    # The progress bar and the closing summary (stderr only).
    assert "loss=" in result.stderr and "tok/s=" in result.stderr and "mem=" in result.stderr
    first, last = expected[0]["eval_loss"], expected[3]["eval_loss"]
    assert f"held-out eval_loss {first:.4g} -> {last:.4g} (step 0 -> 3)" in result.stderr
    assert f"curves: mlxpost plot {out}" in result.stderr
    assert f"tensorboard --logdir {out / 'tensorboard'}" in result.stderr


def wandb_records(path):
    """The records of a W&B transaction log (.wandb): a header, then LevelDB-log chunks of
    serialized `Record` protos in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", path
    pos, pending = header, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # full, or last of first/middle/last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_the_history(tiny_dir, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb-dir"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "WANDB_API_KEY": "",
    }
    result = run(sft_command(tiny_dir / "tiny-gpt2", out, *SHORT, "--report-to", "wandb"), env=env)
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)

    runs = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert len(runs) == 1, os.listdir(out / "wandb")
    assert f"wandb sync {runs[0]}" in result.stderr
    (log,) = glob.glob(os.path.join(runs[0], "run-*.wandb"))
    history, config = {}, {}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            history[record.history.step.num] = {
                k: v for k, v in items.items() if not k.startswith("_")
            }
        elif kind == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
            project = record.run.project
    assert project == "mlxpost" and config["command"] == "sft" and config["steps"] == 3
    assert history == metric_rows(out)


def test_unknown_tracker_is_refused(tiny_dir, tmp_path):
    out = tmp_path / "run"
    result = run(sft_command(tiny_dir / "tiny-gpt2", out, "--report-to", "tensorboard,mlflow"))
    assert_user_error(result, "--report-to: unknown tracker 'mlflow'")
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert not out.exists()


def test_missing_library_is_refused_before_anything_is_written(tiny_dir, tmp_path):
    out = tmp_path / "run"
    hide = "import sys; sys.modules['wandb'] = None; from mlxpost.cli import main; main()"
    args = sft_command(tiny_dir / "tiny-gpt2", out, "--report-to", "wandb")
    result = run([sys.executable, "-c", hide, *args[3:]])  # args[3:]: from "sft" on
    assert_user_error(
        result, "--report-to wandb: the wandb package is not installed; pip install wandb"
    )
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert not out.exists()


# ---- the pieces ----


@pytest.mark.parametrize(
    "value, names",
    [
        (None, ()),
        ("", ()),
        ("none", ()),
        ("tensorboard", ("tensorboard",)),
        (" TensorBoard , wandb,tensorboard", ("tensorboard", "wandb")),
    ],
)
def test_report_to_names(value, names):
    assert parse_report_to(value) == names


@pytest.mark.parametrize(
    "value, message",
    [
        ("tensorflow", "unknown tracker 'tensorflow'"),
        ("none,wandb", "none cannot be combined with wandb"),
    ],
)
def test_report_to_refusals(value, message):
    with pytest.raises(UserError, match=message):
        parse_report_to(value)


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_missing_library_names_the_package(package, monkeypatch):
    for name in list(sys.modules):
        if name == package or name.startswith(package + "."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now fails
    with pytest.raises(UserError) as caught:
        make_trackers([package])
    assert str(caught.value) == (
        f"--report-to {package}: the {package} package is not installed; pip install {package}"
    )


def test_trackers_get_numbers_only():
    assert numeric({"a": 1, "b": 2.5, "c": True, "d": "x", "e": float("nan"), "f": None}) == {
        "a": 1.0,
        "b": 2.5,
    }


class Recorder(Tracker):
    name = "recorder"

    def __init__(self, fail_at=None):
        self.rows, self.closed, self.fail_at = [], None, fail_at

    def start(self, run_dir, config):
        self.rows.append(("start", run_dir))

    def log(self, step, metrics):
        if step == self.fail_at:
            raise OSError("disk full")
        self.rows.append((step, metrics))

    def finish(self, summary, failed=False):
        self.closed = failed


def test_a_failing_tracker_is_dropped_and_the_others_go_on():
    said = []
    good, bad = Recorder(), Recorder(fail_at=1)
    reporter = Reporter([good, bad], said.append)
    reporter.start("run", {})
    for step in range(3):
        reporter.log({"step": step, "loss": 1.0 / (step + 1), "flag": True})
    reporter.finish({"loss": 0.3})
    assert [row[0] for row in good.rows] == ["start", 0, 1, 2]
    assert good.rows[1] == (0, {"loss": 1.0}) and good.closed is False
    assert [row[0] for row in bad.rows] == ["start", 0] and bad.closed is True
    assert said == ["recorder: stopped logging (disk full); metrics.jsonl keeps the record"]


def test_tensorboard_forgets_what_a_resumed_run_logs_again(tmp_path):
    """A resumed run logs again from its checkpoint; TensorBoard shows the second session's
    values from there on, not the first session's."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = TensorBoardTracker()
    first.start(str(tmp_path), {})
    for step in range(6):
        first.log(step, {"loss": float(step)})
    first.finish({})
    second = TensorBoardTracker()
    second.start(str(tmp_path), {})
    for step in range(3, 8):
        second.log(step, {"loss": 10.0 + step})
    second.finish({})
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    shown = [(s.step, s.value) for s in accumulator.Scalars("loss")]
    assert shown == [(0, 0.0), (1, 1.0), (2, 2.0), *((s, 10.0 + s) for s in range(3, 8))]
