"""The shared training loop through `mlxpost sft`: run directory, config merging, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

pytest.importorskip("torch")

FAST = [
    "--backend",
    "torch",
    "--batch-size",
    "4",
    "--max-length",
    "128",
    "--eval-math",
    "0",
    "--eval-text",
    "0",
    "--eval-limit",
    "8",
    "--learning-rate",
    "1e-3",
]


def sft_command(model, output, *extra):
    return [
        sys.executable,
        "-m",
        "mlxpost.cli",
        "sft",
        "--model",
        str(model),
        "--output",
        str(output),
        *FAST,
        *extra,
    ]


def run(args, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)


def losses(output):
    with open(os.path.join(output, "metrics.jsonl")) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f) if "loss" in row}


def test_run_directory_layout(tiny_dir, tmp_path):
    out = tmp_path / "run"
    result = run(
        sft_command(
            tiny_dir / "tiny-gpt2", out, "--steps", "4", "--save-every", "2", "--eval-every", "2"
        )
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and "eval_loss" in summary
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["command"] == "sft" and config["steps"] == 4 and config["learning_rate"] == 1e-3
    assert sorted(losses(out)) == [1, 2, 3, 4]
    assert (out / "checkpoints" / "step-2" / "state.json").is_file()
    for name in ("adapter_config.json", "adapter_model.safetensors", "optimizer.npz", "state.json"):
        assert (out / "final" / name).is_file(), name
    assert "trainable parameters" in result.stderr and "%" in result.stderr
    assert not list(out.glob(".*partial")), "staging directories left behind"


def test_existing_run_directory_is_not_overwritten(tiny_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    result = run(sft_command(tiny_dir / "tiny-gpt2", out, "--steps", "2"))
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_flags_beat_yaml_beat_defaults(tiny_dir, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("steps: 3\nlearning_rate: 5e-4\nlora_rank: 2\n")
    out = tmp_path / "run"
    result = run(
        sft_command(
            tiny_dir / "tiny-gpt2",
            out,
            "--config",
            str(config),
            "--lora-rank",
            "4",
            "--eval-every",
            "0",
        )
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["steps"] == 3  # from YAML
    assert resolved["lora_rank"] == 4  # flag wins
    assert resolved["learning_rate"] == 1e-3  # flag (FAST) wins over YAML
    assert resolved["lora_alpha"] == 16.0  # default
    assert json.loads((out / "final" / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize(
    "text, message",
    [
        ("bogus_option: 1\n", "unknown option(s) bogus_option"),
        ("steps: many\n", "steps must be a int"),
        ("[1, 2]\n", "expected a mapping"),
    ],
)
def test_bad_yaml(tiny_dir, tmp_path, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    result = run(sft_command(tiny_dir / "tiny-gpt2", tmp_path / "run", "--config", str(config)))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_killed_run_resumes_to_the_same_numbers(tiny_dir, tmp_path):
    """SIGKILL right after the step-4 checkpoint, then --resume: same losses as one run."""
    steps = ["--steps", "8", "--save-every", "4", "--eval-every", "0"]
    whole = tmp_path / "whole"
    assert run(sft_command(tiny_dir / "tiny-gpt2", whole, *steps)).returncode == 0

    broken = tmp_path / "broken"
    process = subprocess.Popen(
        sft_command(tiny_dir / "tiny-gpt2", broken, *steps),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = broken / "checkpoints" / "step-4" / "state.json"
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run never wrote its step-4 checkpoint"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (broken / "final").exists(), "the run finished before it could be killed"

    # Nothing but --resume and --output: the run's own settings come from its config.yaml.
    resumed = run([sys.executable, "-m", "mlxpost.cli", "sft", "--resume", "--output", str(broken)])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert yaml.safe_load((broken / "config.yaml").read_text()) == {
        **yaml.safe_load((whole / "config.yaml").read_text()),
        "output": str(broken),
        "resume": True,
    }
    expected, got = losses(whole), losses(broken)
    assert got == expected  # bit for bit, steps 1..8 once each
    assert json.loads((broken / "summary.json").read_text())["loss"] == expected[8]
    assert (broken / "final" / "adapter_model.safetensors").read_bytes() == (
        whole / "final" / "adapter_model.safetensors"
    ).read_bytes()


def snapshot(directory) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_resume_keeps_settings_and_refuses_changes_that_cannot_resume(tiny_dir, tmp_path):
    out = tmp_path / "run"
    assert run(sft_command(tiny_dir / "tiny-gpt2", out, "--steps", "2")).returncode == 0
    before = snapshot(out)
    resume = [sys.executable, "-m", "mlxpost.cli", "sft", "--resume", "--output", str(out)]
    for change, message in [
        (["--lora-rank", "4"], "--lora-rank 8 (given 4)"),
        (["--full"], "--lora True (given False)"),
        (["--learning-rate", "1e-4"], "--learning-rate 0.001 (given 0.0001)"),
    ]:
        result = run(resume + ["--steps", "3"] + change)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
        assert snapshot(out) == before, f"{change} changed the run directory"
    wrong_command = run(
        [sys.executable, "-m", "mlxpost.cli", "dpo", "--resume", "--output", str(out)]
    )
    assert wrong_command.returncode == 2 and "holds a sft run, not dpo" in wrong_command.stderr
    # What may change does: three more steps from final/, with the run's own settings.
    more = run(resume + ["--steps", "5", "--eval-every", "0"])
    assert more.returncode == 0, more.stderr
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["steps"] == 5 and config["batch_size"] == 4 and config["learning_rate"] == 1e-3
    assert sorted(losses(out)) == [1, 2, 3, 4, 5]


def test_resume_without_a_checkpoint_starts_over_without_duplicate_rows(tiny_dir, tmp_path):
    """A run killed before its first checkpoint: --resume trains from step 0 again and the log
    holds each step once."""
    out = tmp_path / "run"
    args = ["--steps", "2", "--save-every", "0", "--eval-every", "0"]
    assert run(sft_command(tiny_dir / "tiny-gpt2", out, *args)).returncode == 0
    whole = out.joinpath("metrics.jsonl").read_text()
    for name in ("final", "summary.json"):  # as if killed before the final checkpoint
        target = out / name
        subprocess.run(["rm", "-rf", str(target)], check=True)
    result = run([sys.executable, "-m", "mlxpost.cli", "sft", "--resume", "--output", str(out)])
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.joinpath("metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [
        json.loads(line)["step"] for line in whole.splitlines()
    ]
    assert losses(out) == {
        row["step"]: row["loss"] for row in map(json.loads, whole.splitlines()) if "loss" in row
    }


def test_non_finite_training_stops_with_exit_3_and_keeps_its_last_finite_checkpoint(tmp_path):
    from mlxpost import assets

    out = tmp_path / "run"
    args = ["--steps", "12", "--save-every", "2", "--eval-every", "0", "--warmup-steps", "0"]
    # lr 1e5 overflows the bundled model's gradients at step 3 (a random tiny model's logits
    # saturate instead). At 1e3, whether they overflow or saturate is decided by rounding.
    result = run(sft_command(assets.default_model(), out, *args, "--learning-rate", "1e5"))
    assert result.returncode == 3, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step ") and "NaN or inf for 3 steps in a row" in last
    assert "Traceback" not in result.stderr
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [row["step"] for row in rows if row.get("nonfinite_updates")]
    assert len(skipped) == 3 and skipped == list(range(skipped[0], skipped[0] + 3))
    from safetensors.numpy import load_file

    checkpoints = sorted((int(p.name.split("-")[1]), p) for p in (out / "checkpoints").iterdir())
    assert checkpoints, "no checkpoint before the values went non-finite"
    for _, path in checkpoints:
        for name, array in load_file(str(path / "adapter_model.safetensors")).items():
            assert np.all(np.isfinite(array)), f"{path.name}: {name} is not finite"


def test_resume_needs_an_existing_run(tiny_dir, tmp_path):
    result = run(sft_command(tiny_dir / "tiny-gpt2", tmp_path / "nothing", "--resume"))
    assert result.returncode == 2 and "no run to resume" in result.stderr
