"""The loss head in chunks of rows: the same losses and gradients as the whole logits.

Every loss reads its logprobs, entropy and divergences through functional.head_terms; the
backends map the language-model head over chunks of rows and recompute each chunk in the
backward pass. For each backend, on a soft-capped tied head (Gemma-2) every loss family, and
GPT-2's tied and Llama's untied head once: the loss, metrics and LoRA gradients with 5-row
chunks equal those computed from the whole logits at once (float32: the same operations, in
smaller matmuls); the chunked path really recomputes; full fine-tuning's gradient reaches the
tied embedding through every chunk; `mlxpost parity` checks it.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from mlxpost.algorithms.distill import distill_loss
from mlxpost.algorithms.dpo import dpo_loss
from mlxpost.algorithms.grpo import GRPOConfig, grpo_loss
from mlxpost.algorithms.ppo import PPOConfig, ppo_loss
from mlxpost.algorithms.preference import DPOConfig
from mlxpost.algorithms.supervised import nll_and_kl_loss
from mlxpost.backend import LoraConfig, get_backend
from mlxpost.backend_shared.heads import logits_chunk_rows, row_chunks
from mlxpost.functional import nll_loss, prediction_mask

pytest.importorskip("torch")

ROWS, WIDTH, CHUNK = 4, 13, 5  # 48 predicted positions: 10 chunks, the last of 3
RTOL = 1e-6


def backend_or_skip(name: str):
    if name == "mlx":
        pytest.importorskip("mlx.core")
    return get_backend(name)


def make_batch() -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 200, size=(ROWS, WIDTH))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    loss_mask = prediction_mask(mask)
    loss_mask[:, :3] = 0  # a prompt
    noise = rng.normal(0.0, 0.3, size=(ROWS, WIDTH)).astype(np.float32) * loss_mask
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "loss_mask": loss_mask,
        # GRPO / PPO inputs: behaviour and reference logprobs near the model's, so ratios clip
        "old_logprobs": noise,
        "ref_logprobs": -noise,
        "advantages": np.array([1.0, -0.5, 0.25, -1.0], np.float32),
        "normaliser": np.float32(loss_mask.sum()),
        "old_values": noise,
        "returns": 2 * noise + 0.1,
    }


LOSSES = {
    "sft+kl": (partial(nll_and_kl_loss, kl_beta=0.1), ()),
    "grpo": (partial(grpo_loss, cfg=GRPOConfig(temperature=0.8, kl_beta=0.05)), ()),
    "ppo": (partial(ppo_loss, cfg=PPOConfig(temperature=0.8)), ("score",)),
    "dpo-live": (partial(dpo_loss, cfg=DPOConfig(reference_mode="live")), ()),
    "distill-jsd": (
        partial(distill_loss, divergence="jsd", beta=0.3, temperature=2.0, sft_weight=0.5),
        ("teacher",),
    ),
}


def lora_model(backend, path, extras):
    model = backend.load_model(path)
    if "score" in extras:
        backend.attach_scalar_head(model, seed=0)
    if "teacher" in extras:
        backend.attach_frozen(model, "teacher", backend.load_model(path))
    backend.attach_lora(model, LoraConfig(rank=4, alpha=8), seed=0)
    params = backend.parameters(model, trainable_only=True)
    rng = np.random.default_rng(1)  # non-zero B: the adapter moves the policy off the reference
    backend.set_parameters(
        model,
        {n: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for n, v in params.items()},
    )
    return model


class Recomputations:
    """Counts chunks run so that the backward pass recomputes them (torch.utils.checkpoint;
    MLX's chained custom function)."""

    def __init__(self, backend, monkeypatch):
        self.count = 0
        if backend.name == "torch":
            import torch_backend.backend as module

            monkeypatch.setattr(module, "checkpoint", self.counting(module.checkpoint))
        else:
            import mlxpost.mlx_backend.backend as module

            monkeypatch.setattr(module, "chained_chunk", self.counting(module.chained_chunk))

    def counting(self, original):
        def wrapped(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        return wrapped


def whole_and_chunked(backend, model, loss_fn, batch, monkeypatch):
    counter = Recomputations(backend, monkeypatch)
    runs = []
    for rows in (0, CHUNK):
        backend.set_logits_chunk(model, rows)
        counter.count = 0
        runs.append((*backend.loss_and_grads(model, loss_fn, batch), counter.count))
    (whole_loss, whole_metrics, whole, whole_count), (loss, metrics, grads, count) = runs
    assert whole_count == 0
    # One call per chunk (MLX: while tracing the step; torch: in the forward pass).
    assert count == len(row_chunks(ROWS * (WIDTH - 1), CHUNK)), count
    assert loss == pytest.approx(whole_loss, rel=RTOL, abs=1e-7)
    assert metrics.keys() == whole_metrics.keys()
    for key, value in whole_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert sorted(grads) == sorted(whole) and whole
    for name, value in whole.items():
        scale = float(np.abs(value).max()) or 1.0
        np.testing.assert_allclose(grads[name], value, rtol=0, atol=RTOL * scale, err_msg=name)
    return whole


# Every loss on Gemma-2's soft-capped tied head; GPT-2's tied and Llama's own lm_head once.
CASES = [("gemma2", loss) for loss in LOSSES] + [("gpt2", "sft+kl"), ("llama", "grpo")]


@pytest.mark.parametrize("arch, loss_name", CASES)
@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
def test_chunked_head_gives_the_same_loss_and_gradients(
    backend_name, arch, loss_name, tiny_dir, monkeypatch
):
    backend = backend_or_skip(backend_name)
    loss_fn, extras = LOSSES[loss_name]
    model = lora_model(backend, str(tiny_dir / f"tiny-{arch}"), extras)
    batch = make_batch()
    if loss_name == "dpo-live":  # 2 pairs: chosen rows, then rejected rows
        batch = {k: batch[k] for k in ("input_ids", "attention_mask", "loss_mask")}
    if loss_name == "ppo":  # per-token advantages
        batch["advantages"] = batch["advantages"][:, None] * batch["loss_mask"]
    grads = whole_and_chunked(backend, model, loss_fn, batch, monkeypatch)
    assert all(np.abs(g).sum() > 0 for g in grads.values())


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
def test_full_fine_tuning_reaches_the_tied_embedding_through_every_chunk(
    backend_name, tiny_dir, monkeypatch
):
    backend = backend_or_skip(backend_name)
    model = backend.load_model(str(tiny_dir / "tiny-gpt2"))
    grads = whole_and_chunked(backend, model, nll_loss, make_batch(), monkeypatch)
    (embedding,) = [n for n in grads if n.endswith("wte.weight")]
    # Rows of tokens never seen as inputs still get the head's gradient (softmax mass).
    assert np.abs(grads[embedding]).sum(axis=1).min() > 0


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
def test_logprobs_are_the_same_in_chunks(backend_name, tiny_dir):
    backend = backend_or_skip(backend_name)
    model = lora_model(backend, str(tiny_dir / "tiny-gemma2"), ())
    batch = make_batch()
    args = (batch["input_ids"], batch["attention_mask"])
    backend.set_logits_chunk(model, 0)
    whole = backend.logprobs(model, *args, temperature=0.7)
    backend.set_logits_chunk(model, 1)
    chunked = backend.logprobs(model, *args, temperature=0.7)  # one-row matmuls: other roundings
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)


def test_default_chunk_size_follows_the_vocabulary():
    assert logits_chunk_rows(None, 256_000) == 65  # 2**24 float32 logits: 64 MB
    assert logits_chunk_rows(None, 1024) == 16_384
    assert logits_chunk_rows(0, 256_000) is None and logits_chunk_rows(7, 256_000) == 7
    with pytest.raises(ValueError, match="at least one row"):
        logits_chunk_rows(-1, 10)
    assert row_chunks(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert row_chunks(10, None) == row_chunks(10, 10) == [slice(0, 10)]


def test_parity_checks_chunked_gradients(tiny_dir):
    """`mlxpost parity`'s check: each backend's gradients with the loss head in chunks against
    its whole-logits ones and against the other backend's; the setting is restored after."""
    pytest.importorskip("mlx.core")
    from mlxpost.parity import ParityRun, ParitySetup

    run = ParityRun(ParitySetup(model=str(tiny_dir / "tiny-gemma2"), batch_size=2))
    check = run.check_chunked_logits_grads()
    assert check.name.startswith("gradients with --logits-chunk")
    assert check.ok and check.max_abs_diff <= check.tolerance, check
    assert "vs its whole-logits" in check.detail, check.detail
    assert all(model.logits_chunk is None for model in run.models)


def test_mlx_head_memory_does_not_grow_with_the_batch(tmp_path):
    """At a 65,536-token vocabulary, an MLX training step's peak grows with the batch by far
    less than one float32 copy of the added rows' logits: the chunks run one after another."""
    mx = pytest.importorskip("mlx.core")
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=65_536,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        tie_word_embeddings=True,
    )
    Gemma2ForCausalLM(config).save_pretrained(tmp_path)
    backend = get_backend("mlx")
    model = backend.load_model(str(tmp_path))
    backend.attach_lora(model, LoraConfig(rank=4, alpha=8), seed=0)
    backend.set_logits_chunk(model, 16)
    peaks = {}
    for rows in (2, 8):
        ids = np.random.default_rng(rows).integers(3, 65_536, size=(rows, 65))
        mask = np.ones_like(ids)
        batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": prediction_mask(mask)}
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        backend.loss_and_grads(model, nll_loss, batch)
        peaks[rows] = mx.get_peak_memory() - base
    one_copy = (8 - 2) * 64 * 65_536 * 4  # float32 logits of the added positions
    assert peaks[8] - peaks[2] < 0.05 * one_copy, (peaks, one_copy)
