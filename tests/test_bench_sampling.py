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
