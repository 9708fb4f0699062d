"""`mlxpost plot`: PNG curves from metrics.jsonl, and clear errors for files it cannot read."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

from mlxpost.errors import UserError
from mlxpost.plot import plot_run, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, lines):
    run_dir.mkdir(exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def training_log():
    """Training metrics every step, evaluations every 20, and values that are not metrics."""
    lines = []
    for step in range(1, 101):
        record = {"step": step, "loss": 3.0 / step, "lr": 1e-4, "note": "warmup", "ok": True}
        if step % 20 == 0:
            record["eval/loss"] = 2.5 / step
            record["curves"] = 0.5  # a metric named like the grid file must not overwrite it
        lines.append(json.dumps(record))
    return lines


def test_writes_a_grid_and_one_png_per_metric(tmp_path):
    write_metrics(tmp_path, training_log())
    written = plot_run(str(tmp_path))
    plots = tmp_path / "plots"
    names = ["curves.png", "loss.png", "lr.png", "eval_loss.png", "curves-2.png"]
    assert written == [str(plots / name) for name in names]
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC
        assert os.path.getsize(path) > 5000  # something was drawn
    assert sorted(os.listdir(plots)) == sorted(names)


def test_sparse_metrics_keep_their_steps(tmp_path):
    write_metrics(tmp_path, training_log() + ["", json.dumps({"step": 101, "loss": None})])
    series = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert set(series) == {"loss", "lr", "eval/loss", "curves"}
    assert series["eval/loss"][0] == [20, 40, 60, 80, 100]
    assert len(series["loss"][0]) == 100


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"step": 1, "loss": 2.0}', '{"step": 2, "loss": '], r"metrics.jsonl:2: not valid JSON"),
        (['{"step": 1, "loss": 2.0}', "[1, 2]"], r"metrics.jsonl:2: expected a JSON object"),
        (['{"loss": 2.0}'], r'metrics.jsonl:1: no numeric "step"'),
        (['{"step": 1, "note": "x"}'], "no numeric metrics"),
    ],
)
def test_unreadable_metrics_are_user_errors(tmp_path, lines, message):
    write_metrics(tmp_path, lines)
    with pytest.raises(UserError, match=message):
        plot_run(str(tmp_path))


def test_missing_run_dir_and_metrics_file(tmp_path):
    with pytest.raises(UserError, match="run directory not found"):
        plot_run(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="metrics.jsonl: not found"):
        plot_run(str(tmp_path))


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mlxpost.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_prints_written_paths(tmp_path):
    write_metrics(tmp_path / "run", training_log())
    result = run_cli("plot", str(tmp_path / "run"), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    paths = result.stdout.split()
    assert paths[0] == str(tmp_path / "out" / "curves.png")
    assert all(os.path.isfile(p) for p in paths) and len(paths) == 5


def test_cli_malformed_line_exits_2_with_one_line(tmp_path):
    write_metrics(tmp_path, ['{"step": 1, "loss": 2.0}', "{oops"])
    result = run_cli("plot", str(tmp_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "metrics.jsonl:2: not valid JSON" in message
