"""`mlxpost grpo` and `mlxpost ppo` end to end: a few steps on the bundled model through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_cli import run_cli

SMALL = [
    "--backend",
    "torch",
    "--steps",
    "2",
    "--batch-size",
    "2",
    "--num-generations",
    "2",
    "--max-new-tokens",
    "8",
    "--eval-every",
    "2",
    "--eval-math",
    "4",
]

# The per-step metrics the RL commands promise (README, issue contract).
GRPO_METRICS = {
    "loss",
    "reward",
    "reward_std",
    "reward/math",
    "reward_std/math",
    "zero_variance_groups",
    "clip_fraction",
    "entropy",
    "completion_length",
    "truncated",
    "logprob_gap",
    "step_seconds",
}


def metrics_of(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_grpo_runs_and_logs_its_metrics(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "grpo"
    result = run_cli("grpo", *SMALL, "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics_of(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "math_accuracy" in rows[0] and "math_accuracy" in rows[2]
    for row in rows[1:]:
        missing = (GRPO_METRICS | {"kl"}) - set(row)
        assert not missing, missing
        assert row["kl"] >= -1e-6  # k3 is non-negative
    assert os.path.isfile(out / "final" / "adapter_config.json")


def test_grpo_without_kl_logging_skips_the_reference(tmp_path):
    """Also runs the importance-sampling correction, which logs the sampler/trainer mismatch:
    mlxpost's sampler matches the trainer to float32 rounding, so every ratio is about 1."""
    pytest.importorskip("torch")
    out = tmp_path / "grpo"
    result = run_cli(
        "grpo",
        *SMALL,
        "--no-log-kl",
        "--importance-correction",
        "sequence_mask",
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for row in metrics_of(out)[1:]:
        assert "kl" not in row
        assert not GRPO_METRICS - set(row)
        assert row["sampler_gap_max"] < 1e-4
        assert row["importance_masked"] == 0.0
        assert abs(row["importance_ratio_max"] - 1) < 1e-3


def test_full_fine_tuning_measures_the_kl_to_the_base_checkpoint(tmp_path):
    """With --full there is no adapter to switch off: the reference is the base checkpoint.
    Its KL is 0 before the first update and positive after it."""
    pytest.importorskip("torch")
    out = tmp_path / "grpo"
    small = [*SMALL, "--eval-math", "0", "--learning-rate", "1e-3", "--warmup-steps", "0"]
    result = run_cli("grpo", *small, "--full", "--kl-beta", "0.1", "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = metrics_of(out)[-2:]
    assert abs(first["kl"]) < 1e-6 and second["kl"] > 1e-4, (first["kl"], second["kl"])


def test_ppo_runs_and_logs_critic_metrics(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "ppo"
    result = run_cli(
        "ppo", *SMALL, "--importance-correction", "token_truncate", "--output", str(out)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics_of(out)
    for row in rows[1:]:
        for key in ("value_loss", "explained_variance", "approx_kl", "score", "reward_kl"):
            assert key in row, key
        assert row["sampler_gap_max"] < 1e-4  # the correction's mismatch metric
    assert os.path.isfile(out / "final" / "adapter_config.json")
    assert os.path.isfile(out / "final" / "critic.npz")  # the separate critic, the default


def test_ppo_adaptive_kl_and_shared_critic_resume_where_they_stopped(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "ppo"
    args = [*SMALL, "--output", str(out), "--kl-target", "0.01", "--kl-horizon", "4"]
    args += ["--critic", "shared", "--value-warmup-steps", "1", "--save-every", "1"]
    assert run_cli("ppo", *args).returncode == 0
    first = metrics_of(out)
    assert first[1]["policy_updates"] == 0  # warmup: the critic alone
    assert first[2]["policy_updates"] > 0
    assert first[2]["kl_coef"] != first[1]["kl_coef"]  # the controller moved it
    with open(out / "final" / "ppo_state.json") as f:
        saved = json.load(f)["kl"]["value"]  # after step 2's update
    result = run_cli("ppo", *args[2:], "--steps", "3", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics_of(out)[3]["kl_coef"] == pytest.approx(saved)


# A reward that sleeps on its SLOW_AT-th call and first leaves a marker, so a test can send
# Ctrl-C at a known point of a run.
SLOW_REWARD = """
import os, time
calls = 0
def slow(prompts, completions, **columns):
    global calls
    calls += 1
    if calls == int(os.environ.get("SLOW_AT", "0")):
        open(os.environ["SLOW_MARKER"], "w").close()
        time.sleep(120)
    return [float(len(c) % 2) for c in completions]
"""


def interrupt_at(args, call: int, marker) -> subprocess.CompletedProcess:
    """Run `mlxpost grpo ARGS`, send SIGINT while the reward's `call`-th call sleeps."""
    env = {**os.environ, "SLOW_AT": str(call), "SLOW_MARKER": str(marker)}
    process = subprocess.Popen(
        [sys.executable, "-m", "mlxpost.cli", "grpo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # The signal must reach the run even when the suite runs as a background job, whose
        # processes inherit an ignored SIGINT.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 240
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run never reached the slow reward call"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_ctrl_c_before_the_first_step_leaves_nothing_and_after_it_resumes(tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "slow.py").write_text(SLOW_REWARD)
    out = tmp_path / "grpo"
    args = [
        *SMALL,
        "--steps",
        "3",
        "--eval-math",
        "0",
        "--save-every",
        "1",
        "--rewards",
        f"{tmp_path / 'slow.py'}:slow",
        "--output",
        str(out),
    ]
    first = interrupt_at(args, 1, tmp_path / "marker-1")
    assert first.returncode == 130, first.stderr[-2000:]
    assert first.stderr.strip().splitlines()[-1] == (
        f"error: interrupted before step 1; nothing was kept in {out}"
    )
    assert "Traceback" not in first.stderr and not out.exists()

    second = interrupt_at(args, 2, tmp_path / "marker-2")
    assert second.returncode == 130, second.stderr[-2000:]
    assert second.stderr.strip().splitlines()[-1] == (
        "error: interrupted after step 1; newest checkpoint: step 1; continue with: "
        f"mlxpost grpo --resume --output {out}"
    )
    assert [row["step"] for row in metrics_of(out)] == [1]
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".partial"))]

    resumed = run_cli("grpo", "--resume", "--output", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [row["step"] for row in metrics_of(out)] == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
