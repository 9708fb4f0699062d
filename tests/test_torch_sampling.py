"""The torch sampler against the installed transformers' current API."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("torch")

from mlxpost.backend import SamplingConfig, get_backend


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_sampling_uses_no_deprecated_transformers_argument(tiny_dir, arch):
    """transformers warns (FutureWarning) before it removes an argument, e.g. past_key_values."""
    backend = get_backend("torch")
    model = backend.load_model(str(tiny_dir / f"tiny-{arch}"))
    cfg = SamplingConfig(max_new_tokens=3, temperature=0.0, n=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        samples = backend.sample(model, [[5, 6, 7], [8, 9]], cfg, [-1], 0, 0)
    assert samples.completion_ids.shape == (4, 3)
