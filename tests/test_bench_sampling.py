"""scripts/bench_sampling.py runs end to end on a tiny shape (figures not asserted)."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def test_bench_sampling_reports_both_tools(tiny_dir, capsys):
    pytest.importorskip("torch")
    from bench_sampling import main

    report = main(
        ["--model", str(tiny_dir / "tiny-llama"), "--backends", "torch", "--prompts", "2"]
        + ["--samples", "2", "--new-tokens", "3", "--json"]
    )
    rates = report["tokens_per_second"]["torch"]
    assert set(rates) == {"mlxpost", "transformers generate"}
    assert report["ratio"]["torch"] > 0
    assert capsys.readouterr().out.count("\n") == 1  # one JSON object


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_speed_of_light_counts_the_weights_a_token_meets(tiny_dir, arch):
    """model_cost's N (from config.json and tensor shapes) is the weight count of every linear
    map the loaded transformers model applies, its head included (tied or not)."""
    torch = pytest.importorskip("torch")
    from bench_sampling import model_cost, speed_of_light
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    path = str(tiny_dir / f"tiny-{arch}")
    module = AutoModelForCausalLM.from_pretrained(path)
    linear = (torch.nn.Linear, Conv1D)
    expected = sum(m.weight.numel() for m in module.modules() if isinstance(m, linear))
    cost = model_cost(path)
    assert cost["matmul_weights"] == expected
    config = module.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    assert cost["kv_width"] == kv_heads * head_dim
    # 2 prompt tokens and 3 new: a query reads 2 + 2 slots on average
    bound = speed_of_light(cost, 2, 10, 3, flops=1e9, bw=1e9)
    kv = 2 * cost["layers"] * 4 * cost["kv_width"]
    assert bound["flops_per_token"] == 2 * expected + 2 * kv
    assert bound["step_memory_seconds"] == pytest.approx((4 * expected + 10 * 4 * kv) / 1e9)
