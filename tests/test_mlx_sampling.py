"""The MLX decode loop: retiring finished rows changes no sampled token."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx.core")

from mlxpost.backend import SamplingConfig, get_backend


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_retiring_finished_rows_changes_no_sample(tiny_dir, arch):
    """How often the loop checks for EOS decides when finished rows leave the batch, never
    which tokens are sampled; the behaviour logprobs are the trainer's on the same tokens."""
    from mlxpost.mlx_backend import sampling

    backend = get_backend("mlx")
    model = backend.load_model(str(tiny_dir / f"tiny-{arch}"))
    prompts = [[5, 6, 7, 9, 11, 4], [8, 9], [3, 4, 12]]  # unequal lengths: left padding
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, n=3)
    eos = list(range(10, 50))
    runs = [
        sampling.sample(model, prompts, cfg, eos, 0, 7, sync_every=every) for every in (1, 5, 1000)
    ]
    first = runs[0]
    assert 0 < first.finished.sum() < len(first.finished), "no row retired early"
    for other in runs[1:]:
        np.testing.assert_array_equal(other.completion_ids, first.completion_ids)
        np.testing.assert_array_equal(other.completion_mask, first.completion_mask)
        np.testing.assert_allclose(other.logprobs, first.logprobs, atol=1e-5)
    ids = np.concatenate([first.prompt_ids, first.completion_ids], axis=1)
    mask = np.concatenate([first.prompt_mask, first.completion_mask], axis=1)
    trainer = backend.logprobs(model, ids, mask, 1.0)[:, first.prompt_ids.shape[1] :]
    gap = np.abs(trainer - first.logprobs) * first.completion_mask
    assert gap.max() < 1e-4, gap.max()
