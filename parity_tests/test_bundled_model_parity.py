"""`mlxpost eval --task math --json` on the bundled model: both backends, same answers."""

from __future__ import annotations

import json
import subprocess
import sys


def evaluate(backend, limit):
    command = [
        sys.executable,
        "-m",
        "mlxpost.cli",
        "eval",
        "--task",
        "math",
        "--json",
        "--backend",
        backend,
        "--limit",
        str(limit),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_bundled_model_math_accuracy_agrees_across_backends(backends):
    # Greedy decoding on identical weights: the same completions, so the same accuracy.
    reports = {backend: evaluate(backend, limit=100) for backend in ("torch", "mlx")}
    torch_report, mlx_report = reports["torch"], reports["mlx"]
    assert torch_report["n"] == mlx_report["n"] == 100
    assert torch_report["accuracy"] == mlx_report["accuracy"]
    assert torch_report["mean_completion_tokens"] == mlx_report["mean_completion_tokens"]
    assert [s["completion"] for s in torch_report["samples"]] == [
        s["completion"] for s in mlx_report["samples"]
    ]
    assert 0 < torch_report["accuracy"] < 1
