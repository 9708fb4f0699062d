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
    """decode_gpt2 on the projection modules runs transformers' own operations: the same
    tokens and the same behaviour logprobs, bit for bit, as the loop through base_model,
    prefill and decode steps alike, rows retiring included (with a LoRA adapter whose update
    is not zero, too). Its (out, in) weight copies are off here (a limit of 0 bytes): they
    round differently, which the next test measures."""
    import numpy as np

    from torch_backend import decode_gpt2, sampling

    backend, model = tiny_gpt2(tiny_dir, lora)
    prompts = [[5, 6, 7, 9, 11, 4], [8, 9], [3, 4, 12]]
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, n=3)
    eos = list(range(10, 40))
    with sampling.eager_attention(model):
        assert decode_gpt2.applies(model)
    monkeypatch.setattr(decode_gpt2, "LAYOUT_LIMIT_BYTES", 0)
    fast = sampling.sample(model, prompts, cfg, eos, 0, 7, backend.device, sync_every=1)
    monkeypatch.setattr(decode_gpt2, "applies", lambda model: False)
    generic = sampling.sample(model, prompts, cfg, eos, 0, 7, backend.device, sync_every=1)
    assert 0 < fast.finished.sum() < len(fast.finished), "no row retired early"
    np.testing.assert_array_equal(fast.completion_ids, generic.completion_ids)
    np.testing.assert_array_equal(fast.logprobs, generic.logprobs)


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_gpt2_step_with_linear_weight_copies_computes_what_the_modules_do(tiny_dir, lora):
    """GPT-2's step multiplying with (out, in) copies of its projections (a folded adapter
    included) gives the module path's hidden states to float32 rounding, prefill and decode;
    no copies are made for an adapter left unfolded or past the byte limit; and sampled
    behaviour logprobs stay the trainer's on the same tokens."""
    import numpy as np
    import torch

    from torch_backend import decode_gpt2, sampling
    from torch_backend import lora as torch_lora

    backend, model = tiny_gpt2(tiny_dir, lora)
    if lora:
        assert decode_gpt2.linear_weights(model) is None  # unfolded: not one matmul
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 3, 4]])
    with torch.no_grad(), sampling.eager_attention(model):
        with torch_lora.merged_for_inference(model.lora.values()):
            assert decode_gpt2.linear_weights(model, limit_bytes=0) is None
            weights = decode_gpt2.linear_weights(model)
            assert weights is not None
            doubled = [[(w * 2, b) for w, b in block] for block in weights]
            modules, copies, wrong = (
                prefill_and_step(model, ids, mask, prepared)
                for prepared in (None, weights, doubled)
            )
    scale = modules.abs().max().item()
    torch.testing.assert_close(copies, modules, rtol=0, atol=1e-5 * scale)
    assert (wrong - modules).abs().max() > 0.1 * scale  # the copies are what is multiplied

    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, n=2)
    samples = sampling.sample(model, [[5, 6, 7, 9], [8, 9]], cfg, [-1], 0, 3, backend.device)
    full = np.concatenate([samples.prompt_ids, samples.completion_ids], axis=1)
    full_mask = np.concatenate([samples.prompt_mask, samples.completion_mask], axis=1)
    trainer = backend.logprobs(model, full, full_mask, 1.0)[:, samples.prompt_ids.shape[1] :]
    np.testing.assert_allclose(samples.logprobs, trainer, atol=2e-5)


def prefill_and_step(model, ids, mask, weights):
    """decode_gpt2's hidden states of a prefill and one decode step of its last tokens."""
    import torch

    from torch_backend import decode_gpt2, sampling

    width = ids.shape[1]
    cache = sampling.DecodeCache(width + 2, "cache")
    masks = sampling.DecodeMasks(model, mask, width + 2)
    first = decode_gpt2.hidden(
        model, ids, masks.build(0, width), sampling.positions(mask), cache, weights
    )
    masks.mark_real(width)
    cache.first = cache.written = width
    position = sampling.positions(mask)[:, -1:] + 1
    step = decode_gpt2.hidden(model, ids[:, -1:], masks.build(width, 1), position, cache, weights)
    return torch.cat([first, step], dim=1)


def tiny_gpt2(tiny_dir, lora: bool):
    """The torch backend and the tiny GPT-2, with a rank-4 adapter whose update is not zero
    when `lora`."""
    import torch

    from mlxpost.backend import LoraConfig

    backend = get_backend("torch")
    model = backend.load_model(str(tiny_dir / "tiny-gpt2"))
    if lora:
        backend.attach_lora(model, LoraConfig(rank=4, alpha=8.0))
        with torch.no_grad():
            for layer in model.lora.values():
                layer.lora_B.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return backend, model
