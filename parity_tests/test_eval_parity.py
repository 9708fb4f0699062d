"""`mlxpost eval --task perplexity` gives the same figure on both backends."""

from __future__ import annotations

import pytest


def test_perplexity_agrees_across_backends(backends, tiny_dir):
    from mlxpost.assets import DATA
    from mlxpost.evaluation import PerplexityConfig, evaluate_perplexity, lm_examples
    from mlxpost.model_dir import max_positions, read_config
    from mlxpost.tokenizer import load_tokenizer

    path = str(tiny_dir / "tiny-gemma2")
    info = load_tokenizer(path)
    # Rows longer than the sliding window (8), padded in batches of 4.
    examples = lm_examples(f"{DATA}/text/test.jsonl", 8)
    cfg = PerplexityConfig(batch_size=4, max_length=max_positions(read_config(path)))
    torch_report, mlx_report = (
        evaluate_perplexity(backend, backend.load_model(path), info, examples, cfg)
        for backend in backends
    )
    assert torch_report["tokens"] == mlx_report["tokens"]
    assert mlx_report["perplexity"] == pytest.approx(torch_report["perplexity"], rel=1e-5)
