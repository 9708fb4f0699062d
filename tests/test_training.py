"""The shared training loop through `mlxpost sft`: run directory, config merging, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

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

    resumed = run(sft_command(tiny_dir / "tiny-gpt2", broken, *steps, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    expected, got = losses(whole), losses(broken)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), f"step {step}"
    assert json.loads((broken / "summary.json").read_text())["loss"] == pytest.approx(
        json.loads((whole / "summary.json").read_text())["loss"], rel=1e-6
    )


def test_resume_needs_an_existing_run(tiny_dir, tmp_path):
    result = run(sft_command(tiny_dir / "tiny-gpt2", tmp_path / "nothing", "--resume"))
    assert result.returncode == 2 and "no run to resume" in result.stderr
