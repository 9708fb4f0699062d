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


@pytest.mark.parametrize("arch", ["gpt2", "gemma2", "mistral", "gemma3_text"])
def test_retiring_finished_rows_changes_no_sample(tiny_dir, arch):
    """How often the loop checks for EOS decides when finished rows leave the batch, never
    which tokens are sampled; the behaviour logprobs are the trainer's on the same tokens."""
    import numpy as np

    from torch_backend import sampling

    backend = get_backend("torch")
    model = backend.load_model(str(tiny_dir / f"tiny-{arch}"))
    prompts = [[5, 6, 7, 9, 11, 4], [8, 9], [3, 4, 12]]  # unequal lengths: left padding
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, n=3)
    eos = list(range(10, 40))
    runs = [
        sampling.sample(model, prompts, cfg, eos, 0, 7, backend.device, sync_every=every)
        for every in (1, 5, 1000)
    ]
    first = runs[0]
    assert 0 < first.finished.sum() < len(first.finished), "no row retired early"
    for other in runs[1:]:
        np.testing.assert_array_equal(other.completion_ids, first.completion_ids)
        np.testing.assert_array_equal(other.completion_mask, first.completion_mask)
        # a smaller batch may round its matmuls differently: logprobs agree to rounding
        np.testing.assert_allclose(other.logprobs, first.logprobs, atol=1e-5)
    ids = np.concatenate([first.prompt_ids, first.completion_ids], axis=1)
    mask = np.concatenate([first.prompt_mask, first.completion_mask], axis=1)
    trainer = backend.logprobs(model, ids, mask, 1.0)[:, first.prompt_ids.shape[1] :]
    gap = np.abs(trainer - first.logprobs) * first.completion_mask
    assert gap.max() < 1e-4, gap.max()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # Conv1D and nn.Linear projections
def test_sampling_folds_float32_adapters_into_their_weights(tiny_dir, arch, monkeypatch):
    """While sampling, every enabled adapter runs as one projection with its update folded into
    a copy of the base weight: each layer gives its unmerged output to float32 rounding, the
    sampler's behaviour logprobs stay the trainer's (unmerged) ones on the same tokens, a
    disabled adapter and a budget too small for the copies merge nothing, and nothing stays
    merged afterwards."""
    import numpy as np
    import torch

    from mlxpost.backend import LoraConfig
    from torch_backend import lora, sampling

    backend = get_backend("torch")
    model = backend.load_model(str(tiny_dir / f"tiny-{arch}"))
    backend.attach_lora(model, LoraConfig(rank=4, alpha=8.0))
    layers = list(model.lora.values())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.weight.normal_(0, 0.05, generator=generator)
    inputs = [torch.randn(2, 3, layer.in_features, generator=generator) for layer in layers]
    with torch.no_grad():
        plain = [layer(x) for layer, x in zip(layers, inputs)]
        with lora.merged_for_inference(layers) as count:
            assert count == len(layers)
            merged = [layer(x) for layer, x in zip(layers, inputs)]
        for layer, x, want, got in zip(layers, inputs, plain, merged):
            # float32 rounding of sums of a few hundred products, relative to the output's size
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
            assert (want - layer.base_layer(x)).abs().max() > 1e-3  # the update is not zero
        with lora.merged_for_inference(layers, limit_bytes=0) as count:
            assert count == 0
        layers[0].enabled = False
        with lora.merged_for_inference(layers) as count:
            assert count == len(layers) - 1 and layers[0].merged is None
        layers[0].enabled = True
    assert all(layer.merged is None for layer in layers)

    calls = []
    real = lora.merged_for_inference

    def spy(layers, limit_bytes=None):
        calls.append(len(list(layers)))
        return real(model.lora.values(), limit_bytes)

    monkeypatch.setattr(lora, "merged_for_inference", spy)
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, n=2)
    samples = sampling.sample(model, [[5, 6, 7, 9], [8, 9]], cfg, [-1], 0, 3, backend.device)
    assert calls == [len(layers)]
    ids = np.concatenate([samples.prompt_ids, samples.completion_ids], axis=1)
    mask = np.concatenate([samples.prompt_mask, samples.completion_mask], axis=1)
    trainer = backend.logprobs(model, ids, mask, 1.0)[:, samples.prompt_ids.shape[1] :]
    np.testing.assert_allclose(samples.logprobs, trainer, atol=2e-5)


@pytest.mark.parametrize("arch", ["gpt2", "gemma2", "llama"])
def test_blocked_head_gives_the_head_logits(tiny_dir, arch):
    """The decode head in vocabulary blocks (soft-capped after, on Gemma-2) gives lm_logits'
    numbers to float32 rounding. The tiny vocabularies fit one default block, so a block of
    100 rows (an uneven last block) is asked for."""
    import torch

    from torch_backend import sampling
    from torch_backend.modeling import lm_logits

    backend = get_backend("torch")
    model = backend.load_model(str(tiny_dir / f"tiny-{arch}"))
    hidden = torch.randn(
        5, model.module.config.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        whole = lm_logits(model, hidden)
        blocked = sampling.head_logits(model, hidden, 100)
    assert blocked.shape == whole.shape
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_written_out_gpt2_step_samples_what_transformers_forward_does(tiny_dir, lora, monkeypatch):
    """decode_gpt2 runs transformers' own operations: the same tokens and the same behaviour
    logprobs, bit for bit, as the loop through base_model, prefill and decode steps alike,
    rows retiring included (with a LoRA adapter whose update is not zero, too)."""
    import numpy as np
    import torch

    from mlxpost.backend import LoraConfig
    from torch_backend import decode_gpt2, sampling

    backend = get_backend("torch")
    model = backend.load_model(str(tiny_dir / "tiny-gpt2"))
    if lora:
        backend.attach_lora(model, LoraConfig(rank=4, alpha=8.0))
        with torch.no_grad():
            for layer in model.lora.values():
                layer.lora_B.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    prompts = [[5, 6, 7, 9, 11, 4], [8, 9], [3, 4, 12]]
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, n=3)
    eos = list(range(10, 40))
    with sampling.eager_attention(model):
        assert decode_gpt2.applies(model)
    fast = sampling.sample(model, prompts, cfg, eos, 0, 7, backend.device, sync_every=1)
    monkeypatch.setattr(decode_gpt2, "applies", lambda model: False)
    generic = sampling.sample(model, prompts, cfg, eos, 0, 7, backend.device, sync_every=1)
    assert 0 < fast.finished.sum() < len(fast.finished), "no row retired early"
    np.testing.assert_array_equal(fast.completion_ids, generic.completion_ids)
    np.testing.assert_array_equal(fast.logprobs, generic.logprobs)
