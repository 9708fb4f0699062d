"""Packed rows (several examples per row, the attention mask holding segment ids) on every
architecture: each example's logprobs and gradients are those of the example run on its own,
in both backends, and the two backends agree on packed rows.

The examples are longer than the sliding window where there is one, so windowed layers must
apply the window inside a segment; a packed row read with a plain 0/1 mask instead gives other
numbers, so the comparisons are not vacuous. Tolerance: float32 rounding, 1e-5 of the largest
magnitude compared (as parity_tests/test_backends.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from mlxpost.backend import LoraConfig
from mlxpost.data import pad_batch, pad_packed
from mlxpost.functional import nll_loss, prediction_mask
from mlxpost.parity import default_seq_len, parity_lora_init

RTOL = 1e-5


def assert_close(name, reference, other, rtol=RTOL):
    reference = np.asarray(reference, np.float64)
    other = np.asarray(other, np.float64)
    assert reference.shape == other.shape, f"{name}: shapes {reference.shape} vs {other.shape}"
    diff = np.abs(reference - other)
    tolerance = rtol * max(1.0, float(np.abs(reference).max()))
    assert diff.max() <= tolerance, (
        f"{name}: max abs diff {diff.max():.3g}, mean {diff.mean():.3g}, tolerance {tolerance:.3g}"
    )


def examples_for(config: dict, seed: int = 0):
    """Seeded token ids of six examples, the first longer than any sliding window, packed
    into two rows with room left over (so each row also ends in padding)."""
    length = default_seq_len(config)  # the window + 16 at least, within the positions
    rng = np.random.default_rng(seed)
    lengths = [length - 20, 11, length // 2, 5, 2, 9]
    examples = [rng.integers(1, int(config["vocab_size"]), n).tolist() for n in lengths]
    rows = [[0, 1], [2, 3, 4, 5]]
    ids, segments = pad_packed([[examples[i] for i in row] for row in rows], 0, length + 3)
    return examples, rows, ids, segments


def packed_values(values, rows, examples):
    """Per example, the packed row's values at its tokens (the first excluded)."""
    out = []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = len(examples[i])
            out.append(values[r, start + 1 : start + n])
            start += n
    return out


def separate_values(values, rows, examples):
    """The same, from a right-padded batch holding one example per row."""
    return [values[i, 1 : len(examples[i])] for row in rows for i in row]


def lora_model(backend, checkpoint):
    model = backend.load_model(checkpoint)
    backend.attach_lora(model, LoraConfig(rank=4, alpha=8.0), seed=0)
    backend.set_parameters(model, parity_lora_init(backend.parameters(model, True), 0))
    return model


def test_packed_logprobs_equal_separate_ones(backends, checkpoint):
    for backend in backends:
        model = backend.load_model(checkpoint)
        examples, rows, ids, segments = examples_for(model.config)
        packed = backend.logprobs(model, ids, segments)
        separate = backend.logprobs(model, *pad_batch(examples, 0))
        for k, (p, s) in enumerate(
            zip(packed_values(packed, rows, examples), separate_values(separate, rows, examples))
        ):
            assert_close(f"{backend.name} example {k} packed vs alone", s, p)
        # The segment ids matter: read as one sequence, the row's later examples change.
        flat = backend.logprobs(model, ids, (segments > 0).astype(np.int32))
        later = packed_values(flat, rows, examples)[1]
        assert np.abs(later - separate_values(separate, rows, examples)[1]).max() > 1e-3


def test_backends_agree_on_packed_rows(backends, checkpoint):
    models = [backend.load_model(checkpoint) for backend in backends]
    _, _, ids, segments = examples_for(models[0].config, seed=1)
    ref, other = (b.logprobs(m, ids, segments) for b, m in zip(backends, models))
    counted = prediction_mask(segments).astype(bool)
    assert_close("packed logprobs, torch vs mlx", ref[counted], other[counted])
    hot = [b.logprobs(m, ids, segments, temperature=0.7) for b, m in zip(backends, models)]
    assert_close("packed logprobs at T=0.7, torch vs mlx", hot[0][counted], hot[1][counted])


def test_packed_gradient_equals_unpacked(backends, checkpoint):
    """One packed batch and the unpacked batch of the same examples count the same loss
    tokens, so their mean NLL and every LoRA gradient agree; the backends agree on both."""
    results = []
    for backend in backends:
        model = lora_model(backend, checkpoint)
        examples, rows, ids, segments = examples_for(model.config, seed=2)
        packed = {
            "input_ids": ids,
            "attention_mask": segments,
            "loss_mask": prediction_mask(segments).astype(np.float32),
        }
        order = [i for row in rows for i in row]
        sids, smask = pad_batch([examples[i] for i in order], 0)
        unpacked = {
            "input_ids": sids,
            "attention_mask": smask,
            "loss_mask": prediction_mask(smask).astype(np.float32),
        }
        assert packed["loss_mask"].sum() == unpacked["loss_mask"].sum()
        loss_p, _, grads_p = backend.loss_and_grads(model, nll_loss, packed)
        loss_u, _, grads_u = backend.loss_and_grads(model, nll_loss, unpacked)
        assert loss_p == pytest.approx(loss_u, rel=RTOL)
        assert grads_p.keys() == grads_u.keys() and grads_p
        for name in grads_u:
            assert_close(f"{backend.name} {name} packed vs unpacked", grads_u[name], grads_p[name])
        results.append((loss_p, grads_p))
    (loss_t, grads_t), (loss_m, grads_m) = results
    assert loss_t == pytest.approx(loss_m, rel=RTOL)
    for name in grads_t:
        assert_close(f"{name} packed, torch vs mlx", grads_t[name], grads_m[name])
