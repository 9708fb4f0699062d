"""`mlxpost parity` as a user runs it: a subprocess, JSON on stdout, exit status."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mlxpost.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_parity_command_on_sliding_window_gemma2(tiny_dir, backends):
    """Gemma-2 with a sliding window of 8 on 40+ token sequences, float32."""
    model = tiny_dir / "tiny-gemma2"
    assert json.loads((model / "config.json").read_text())["sliding_window"] == 8
    result = run_cli("parity", "--model", str(model), "--seq-len", "44", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)  # exactly one JSON object on stdout
    assert report["ok"] is True
    names = [c["name"] for c in report["checks"]]
    assert any("left padding, 44 tokens" in n for n in names)
    assert any(n.startswith("gradients") for n in names) and any(
        n.startswith("greedy") for n in names
    )
    for check in report["checks"]:
        assert set(check) >= {"name", "max_abs_diff", "tolerance", "ok"}
        assert check["ok"] and check["max_abs_diff"] <= check["tolerance"]


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_parity_command_table(tiny_dir, backends, dtype):
    result = run_cli("parity", "--model", str(tiny_dir / "tiny-gpt2"), "--dtype", dtype)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parity: ok" in result.stdout and "logprobs (right padding" in result.stdout


def test_parity_command_with_adapter(tiny_dir, backends, tmp_path):
    from mlxpost.backend import LoraConfig, OptimConfig
    from mlxpost.functional import nll_loss, prediction_mask

    torch_backend, _ = backends
    model = torch_backend.load_model(str(tiny_dir / "tiny-gpt2"))
    torch_backend.attach_lora(model, LoraConfig(rank=2, alpha=4.0))
    batch_ids = np.tile(np.arange(5, 17), (2, 1))
    mask = np.ones_like(batch_ids)
    batch = {
        "input_ids": batch_ids,
        "attention_mask": mask,
        "loss_mask": prediction_mask(mask).astype(np.float32),
    }
    optimizer = torch_backend.make_optimizer(
        model, OptimConfig(learning_rate=1e-2, warmup_steps=0, total_steps=3)
    )
    for _ in range(3):
        torch_backend.train_step(model, optimizer, nll_loss, [batch])
    torch_backend.save_adapter(model, str(tmp_path))
    result = run_cli(
        "parity", "--model", str(tiny_dir / "tiny-gpt2"), "--adapter", str(tmp_path), "--json"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["ok"] is True


# Checkpoints configured otherwise than the tiny ones of the session: the families' other
# options (tied or untied heads, no rope scaling, no window, defaults left to transformers).
VARIANTS = {
    "llama-tied-plain-rope": ("llama", {"tie_word_embeddings": True, "rope_scaling": None}),
    "mistral-no-window-mha": ("mistral", {"sliding_window": None, "num_key_value_heads": 4}),
    "qwen2-no-window-untied": (
        "qwen2",
        {"use_sliding_window": False, "tie_word_embeddings": False},
    ),
    "qwen3-window-untied": (
        "qwen3",
        {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 0},
    ),
    "gemma2-linear-rope": ("gemma2", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "gemma3-default-pattern": ("gemma3_text", {"num_hidden_layers": 2, "rope_scaling": None}),
    "phi3-full-rotary": ("phi3", {"partial_rotary_factor": 1.0, "rope_scaling": None}),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_in_process_on_other_configurations(variant, dtype, tiny_builder, tmp_path):
    """`mlxpost parity` (its library entry point) passes on checkpoints built with other
    options than the session's tiny ones."""
    pytest.importorskip("mlx.core")
    from mlxpost.parity import ParitySetup, run_parity

    arch, overrides = VARIANTS[variant]
    tiny_builder.build(arch, str(tmp_path), seed=3, **overrides)
    report = run_parity(ParitySetup(model=str(tmp_path), dtype=dtype))
    failed = [c for c in report["checks"] if not c["ok"]]
    assert report["ok"] and not failed, failed
