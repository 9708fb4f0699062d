"""`mlxpost grpo` and `mlxpost ppo` end to end: a few steps on the bundled model through the CLI."""

from __future__ import annotations

import json
import os

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
    pytest.importorskip("torch")
    out = tmp_path / "grpo"
    result = run_cli("grpo", *SMALL, "--no-log-kl", "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    for row in metrics_of(out)[1:]:
        assert "kl" not in row
        assert not GRPO_METRICS - set(row)


def test_ppo_runs_and_logs_critic_metrics(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "ppo"
    result = run_cli("ppo", *SMALL, "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics_of(out)
    for row in rows[1:]:
        for key in ("value_loss", "explained_variance", "approx_kl", "score", "reward_kl"):
            assert key in row, key
    assert os.path.isfile(out / "final" / "adapter_config.json")
