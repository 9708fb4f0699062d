"""The pure helpers of scripts/bench_peers.py (the scripts/peer_bench package): FLOP counts,
tables, plans, reports.

No peer (TRL, mlx-lm, mlx-lm-lora) is run or imported here.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from peer_bench.cli import parse_args
from peer_bench.measuring import PeerUnavailable, import_peer, split_rows
from peer_bench.plan import (
    MODELS,
    PLANS,
    QUICK_PLANS,
    bench_reward,
    lora_params,
    lora_train_flops_per_token,
    matmul_params,
    mfu,
)
from peer_bench.report import fmt, markdown_table, render, to_json
from peer_bench.results import Result, throughput
from peer_bench.run import selected_jobs
from peer_bench.worker import WORKERS, worker_main

with open(os.path.join(ROOT, "mlxpost", "assets", "model", "config.json")) as f:
    TINY = json.load(f)  # n_embd 256, 4 layers, vocab 1024
GPT2_124M = {
    "model_type": "gpt2",
    "n_embd": 768,
    "n_layer": 12,
    "vocab_size": 50257,
    "n_inner": None,
}


def test_matmul_params_counts_layers_and_head():
    d, layers, vocab = 256, 4, 1024
    assert matmul_params(TINY) == layers * 12 * d * d + vocab * d
    # GPT-2 124M: 85.0M in the blocks plus the 38.6M tied head (embeddings themselves excluded)
    assert matmul_params(GPT2_124M) == 123_532_032


def test_lora_params_match_the_adapter_mlxpost_attaches():
    # rank 8 on c_attn (256->768), attn.c_proj (256->256), c_fc (256->1024), mlp.c_proj
    # (1024->256) in 4 layers: the 131,072 trainable parameters mlxpost reports
    assert lora_params(TINY, 8) == 131_072
    assert lora_params(TINY, 8, ("c_attn",)) == 4 * 8 * (256 + 768)
    assert lora_params(TINY, 16) == 2 * lora_params(TINY, 8)


def test_lora_train_flops_formula():
    seq_len = 128
    expected = 4 * matmul_params(TINY) + 6 * lora_params(TINY, 8) + 12 * 4 * 256 * seq_len
    assert lora_train_flops_per_token(TINY, seq_len, 8) == expected
    # the attention term grows with the sequence, the weight terms do not
    longer = lora_train_flops_per_token(TINY, 2 * seq_len, 8)
    assert longer - expected == 12 * 4 * 256 * seq_len


def test_flops_refuse_other_architectures():
    with pytest.raises(ValueError, match="GPT-2"):
        matmul_params({"model_type": "gemma2"})


def test_mfu_and_throughput():
    assert mfu(1000.0, 2e6, 4e9) == pytest.approx(0.5)
    assert throughput(256, [0.5, 0.5]) == pytest.approx(512.0)  # 2 steps in 1 s
    assert throughput(1, [1.0, 3.0]) == pytest.approx(0.5)
    assert np.isnan(throughput(1, []))


def test_split_rows_cuts_consecutive_rows():
    stream = np.arange(20, dtype=np.int32)
    rows = split_rows(stream, 4, 3)
    assert rows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(ValueError, match="shorter"):
        split_rows(stream, 8, 3)


def test_markdown_table_alignment_and_escaping():
    table = markdown_table(["tool", "tokens/s"], [["a|b", "1,234"]], right={1})
    lines = table.splitlines()
    assert lines[0] == "| tool | tokens/s |"
    assert lines[1] == "| --- | ---: |"
    assert lines[2] == "| a\\|b | 1,234 |"


def test_fmt_missing_values():
    assert fmt(None) == "n/a"
    assert fmt(float("nan")) == "n/a"
    assert fmt(1234.5, ",.0f") == "1,234"


def test_bench_reward_plain_and_conversational():
    assert bench_reward([], ["a b a b", ""]) == [0.5, 0.0]
    conversational = [[{"role": "assistant", "content": "x y z"}]]
    assert bench_reward([], conversational) == [1.0]


def test_jobs_pair_each_tool_with_its_framework_and_tasks():
    args = parse_args(["--tasks", "sft,dpo", "--models", "tiny"])
    jobs = selected_jobs(args)
    assert ("sft", "tiny", "torch", "trl") in jobs
    assert ("sft", "tiny", "mlx", "mlx-lm") in jobs
    assert ("dpo", "tiny", "mlx", "mlx-lm-lora") in jobs
    assert not any(tool == "mlx-lm" and task != "sft" for task, _, _, tool in jobs)
    assert not any(task == "grpo" for task, _, _, _ in jobs)
    # the baseline runs before its peers within a framework
    assert jobs.index(("sft", "tiny", "torch", "mlxpost-torch")) < jobs.index(
        ("sft", "tiny", "torch", "trl")
    )


def test_parse_args_rejects_unknown_names():
    with pytest.raises(SystemExit):
        parse_args(["--tools", "unsloth"])
    assert parse_args(["--quick"]).models == ["tiny"]
    assert parse_args([]).models == list(MODELS)


def test_plans_keep_mlx_lm_rows_unpadded():
    # mlx-lm pads a batch to 1 + a multiple of 32 columns: seq_len a multiple of 32 adds none
    for plans in (PLANS, QUICK_PLANS):
        for plan in plans.values():
            assert plan.sft_seq_len % 32 == 0
            assert plan.dpo_length % 16 == 0  # mlxpost pads rows to a multiple of 16


def _result(tool, framework, task, seconds, status="ok", reason="", units_per_step=256.0):
    return Result(
        task=task,
        model="tiny",
        framework=framework,
        tool=tool,
        shape="4x64" if task == "sft" else "2x32",
        status=status,
        reason=reason,
        warmup=1,
        steps=len(seconds),
        step_seconds=seconds,
        units="tokens" if task == "sft" else "pairs",
        units_per_step=units_per_step,
        peak_rss_mib=500.0,
    )


def test_render_reports_speed_mfu_and_unavailable_rows():
    results = [
        _result("mlxpost-torch", "torch", "sft", [0.5, 0.5]),
        _result("trl", "torch", "sft", [1.0, 1.0]),
        _result("mlxpost-torch", "torch", "dpo", [1.0], units_per_step=2.0),
        _result("trl", "torch", "dpo", [], status="not available", reason="cannot import trl"),
    ]
    report = {
        "results": results,
        "calibration": {"torch": {"flops": 1e10, "median_flops": 9e9, "size": 1024}},
        "configs": {"tiny": TINY},
        "plans": {"tiny/torch": asdict(PLANS[("tiny", "torch")])},
        "machine": {"cpu": "test"},
        "versions": {"trl": "not installed"},
        "wall_seconds": 1.0,
    }
    text = render(report, "python scripts/bench_peers.py --quick")
    assert "| tiny | torch | trl | 4x64 | 1+2 | 1.000 | 256 | 0.50x |" in text
    flops = lora_train_flops_per_token(TINY, 64, 8)
    assert f"{512 * flops / 1e9:.2f}" in text  # mlxpost: 512 tokens/s
    assert f"{100 * 512 * flops / 1e10:.1f}" in text  # its MFU %
    assert "dpo / tiny / trl: not available: cannot import trl" in text
    assert "python scripts/bench_peers.py --quick" in text
    payload = to_json(report)
    assert payload["results"][0]["mfu"] == pytest.approx(512 * flops / 1e10)
    assert payload["results"][3]["rate"] is None


def test_repeats_pool_steps_and_sampling_figures():
    first = _result("mlxpost-torch", "torch", "grpo", [1.0, 1.0], units_per_step=1.0)
    first.step_cpu_seconds = [2.0, 2.0]
    first.extra = {"completion_tokens": [64, 64], "sampling_seconds": [0.5, 0.5]}
    second = _result("mlxpost-torch", "torch", "grpo", [2.0], units_per_step=1.0)
    second.step_cpu_seconds = [1.0]
    second.extra = {"completion_tokens": [64], "sampling_seconds": [1.0]}
    first.merge(second)
    assert first.step_seconds == [1.0, 1.0, 2.0] and first.steps == 3
    assert first.rate() == pytest.approx(3 / 4)  # steps per second
    assert first.cpu_per_wall() == pytest.approx(5 / 4)
    sampling = first.sampling()
    assert sampling["completion_tokens_per_step"] == pytest.approx(64)
    assert sampling["sampling_tokens_per_s"] == pytest.approx(192 / 2.0)
    assert sampling["sampling_share"] == pytest.approx(2.0 / 4.0)


def test_a_failed_repeat_is_noted_not_pooled():
    good = _result("trl", "torch", "sft", [1.0])
    good.merge(_result("trl", "torch", "sft", [], status="failed", reason="boom"))
    assert good.step_seconds == [1.0]
    assert "a repeat failed: boom" in good.extra["note"]
    bad = _result("trl", "torch", "sft", [], status="failed", reason="boom")
    bad.merge(_result("trl", "torch", "sft", [0.5]))
    assert bad.ok and bad.step_seconds == [0.5]
    assert "a repeat failed: boom" in bad.extra["note"]


def test_a_missing_peer_is_reported_not_raised(tmp_path, monkeypatch):
    with pytest.raises(PeerUnavailable, match="cannot import no_such_peer_module"):
        import_peer("no_such_peer_module", "no-such-peer")

    def missing(spec):
        import_peer("no_such_peer_module", "no-such-peer")

    def broken(spec):
        raise RuntimeError("boom")

    monkeypatch.setitem(WORKERS, ("sft", "missing"), missing)
    monkeypatch.setitem(WORKERS, ("sft", "broken"), broken)
    for tool, status in (("missing", "not available"), ("broken", "failed")):
        spec_path, out_path = tmp_path / f"{tool}.json", tmp_path / f"{tool}.out.json"
        spec_path.write_text(json.dumps({"task": "sft", "tool": tool}))
        worker_main(str(spec_path), str(out_path))
        result = json.loads(out_path.read_text())
        assert result["status"] == status
        assert result["peak_rss_mib"] > 0
    assert "boom" in result["reason"]
