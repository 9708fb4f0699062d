"""QLoRA: `--quantize 4|8` trains a LoRA adapter on a quantized frozen base (MLX backend).

The exact check: a quantized model computes the logits of the float32 model whose block
linear weights were replaced by dequantize(quantize(w)), within float32 rounding. The loose
one: its logits stay near the float32 model's. Random tiny weights are the hard case for
quantization (no outliers to spare, one group of 64 per row), so the bound is loose: relative
Frobenius error of the logits under 0.8 at 4 bits and 0.08 at 8 bits (measured over the
tiny checkpoints: 0.08 to 0.53 at 4 bits, 0.005 to 0.033 at 8 bits).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mlxpost.assets import default_data

pytest.importorskip("torch")  # tiny_dir builds its checkpoints with transformers
mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from mlxpost.backend import LoraConfig, SamplingConfig  # noqa: E402
from mlxpost.mlx_backend.backend import MLXBackend  # noqa: E402
from mlxpost.mlx_backend.lora import _submodule  # noqa: E402
from mlxpost.mlx_backend.models.gpt2 import Conv1D  # noqa: E402

ARCHITECTURES = ["gpt2", "gemma2", "llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"]
LOOSE = {4: 0.8, 8: 0.08}
IDS = np.random.default_rng(0).integers(4, 320, size=(2, 12))
MASK = np.ones_like(IDS)


def invoke(*args: str):
    from mlxpost.cli import main

    return CliRunner().invoke(main, list(args))


def relative(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def round_trip(weight: mx.array, bits: int) -> mx.array:
    packed = mx.quantize(weight, group_size=64, bits=bits)
    return mx.dequantize(*packed, group_size=64, bits=bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_logits_equal_round_tripped_weights(bits, tiny_dir):
    backend = MLXBackend()
    for arch in ARCHITECTURES:
        path = str(tiny_dir / f"tiny-{arch}")
        full = backend.load_model(path)
        quantized = backend.load_model(path, quantize=bits)
        layers = [
            p for p, m in quantized.module.named_modules() if isinstance(m, nn.QuantizedLinear)
        ]
        assert layers, arch
        assert all((".layers." in p or ".h." in p) for p in layers), arch  # blocks only
        assert not any(
            isinstance(m, nn.QuantizedEmbedding) for _, m in quantized.module.named_modules()
        )
        reference = backend.load_model(path)
        for p in layers:
            layer = _submodule(reference.module, p)
            if isinstance(layer, Conv1D):  # stored (in, out)
                layer.weight = round_trip(layer.weight.T, bits).T
            else:
                layer.weight = round_trip(layer.weight, bits)
        ours = backend.token_logits(quantized, IDS, MASK)
        exact = backend.token_logits(reference, IDS, MASK)
        plain = backend.token_logits(full, IDS, MASK)
        scale = np.abs(exact).max()
        np.testing.assert_allclose(ours, exact, rtol=0, atol=2e-5 * scale, err_msg=arch)
        error = relative(ours, plain)
        print(f"{arch} {bits}-bit: {len(layers)} layers, logits relative error {error:.3f}")
        assert 0 < error < LOOSE[bits], arch


def test_lora_on_a_quantized_base(tiny_dir):
    """Gradients reach LoRA only; the sampler's behaviour logprobs are the trainer's."""
    backend = MLXBackend()
    model = backend.load_model(str(tiny_dir / "tiny-llama"), quantize=4)
    backend.attach_lora(model, LoraConfig(rank=4, alpha=8.0), seed=0)
    assert all(isinstance(layer.base_layer, nn.QuantizedLinear) for layer in model.lora.values())
    for layer in model.lora.values():  # a non-zero update, so the adapter counts
        layer.lora_B.weight = mx.random.normal(layer.lora_B.weight.shape) * 0.05
        assert layer.in_features % 64 == 0 and layer.lora_A.weight.dtype == mx.float32

    def loss_fn(ops, forward, batch):
        logits = forward.logits(batch["input_ids"], batch["attention_mask"])
        return (logits**2).mean(), {}

    loss, _, grads = backend.loss_and_grads(
        model, loss_fn, {"input_ids": IDS, "attention_mask": MASK}
    )
    assert np.isfinite(loss) and grads
    assert all(".lora_A." in n or ".lora_B." in n for n in grads), sorted(grads)[:3]
    assert all(np.abs(g).sum() > 0 for g in grads.values())
    assert set(grads) == set(backend.parameters(model, trainable_only=True))

    samples = backend.sample(
        model, [[5, 9, 13], [7, 3]], SamplingConfig(max_new_tokens=6), [2], 0, seed=1
    )
    ids = np.concatenate([samples.prompt_ids, samples.completion_ids], axis=1)
    mask = np.concatenate([samples.prompt_mask, samples.completion_mask], axis=1)
    trainer = backend.logprobs(model, ids, mask)[:, samples.prompt_ids.shape[1] :]
    gap = np.abs(trainer - samples.logprobs)[samples.completion_mask.astype(bool)]
    assert gap.size and gap.max() < 1e-4, gap.max()


def test_sft_with_quantize_then_merge_into_the_full_base(tiny_dir, tmp_path):
    """A short `sft --quantize 4` run; its adapter merges into the unquantized base, and the
    merged checkpoint computes the float32 base + adapter."""
    base = str(tiny_dir / "tiny-llama")
    data = tmp_path / "sft.jsonl"
    with open(default_data("sft"), encoding="utf-8") as f:
        data.write_text("".join(next(f) for _ in range(8)), encoding="utf-8")
    out = tmp_path / "run"
    result = invoke(
        "sft",
        *("--model", base, "--data", str(data), "--backend", "mlx", "--quantize", "4"),
        *("--output", str(out), "--steps", "2", "--batch-size", "2", "--eval-every", "0"),
        *("--save-every", "0", "--eval-math", "0", "--eval-text", "0"),
        *("--learning-rate", "1e-2", "--warmup-steps", "0"),
    )
    assert result.exit_code == 0, result.output[-2000:]
    assert "4-bit base" in result.output
    config = (out / "config.yaml").read_text()
    assert "quantize: 4" in config
    adapter = str(out / "final")

    merged = str(tmp_path / "merged")
    result = invoke("merge", "--model", base, "--adapter", adapter, "--output", merged)
    assert result.exit_code == 0, result.output[-2000:]
    backend = MLXBackend()
    with_adapter = backend.load_model(base)
    backend.load_adapter(with_adapter, adapter)
    expected = backend.token_logits(with_adapter, IDS, MASK)
    assert relative(expected, backend.token_logits(backend.load_model(base), IDS, MASK)) > 1e-3
    got = backend.token_logits(backend.load_model(merged), IDS, MASK)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied head (quantized too); tied
def test_loads_a_checkpoint_mlx_lm_quantized(arch, tiny_dir, tmp_path):
    mlx_lm = pytest.importorskip("mlx_lm")
    from mlxpost.export import export_model

    output = export_model(
        str(tiny_dir / f"tiny-{arch}"), str(tmp_path / "q4"), "mlx", None, quantize=4, warn=print
    )
    assert json.loads(Path(output, "config.json").read_text())["quantization"]["bits"] == 4
    backend = MLXBackend()
    model = backend.load_model(output)
    kinds = {type(m).__name__ for _, m in model.module.named_modules()}
    assert {"QuantizedLinear", "QuantizedEmbedding"} <= kinds
    ids = IDS[:, :8]
    ours = backend.token_logits(model, ids, np.ones_like(ids))
    theirs = np.array(mlx_lm.load(output)[0](mx.array(ids)).astype(mx.float32))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())
    backend.attach_lora(model, LoraConfig(rank=4, alpha=8.0))  # QLoRA on it works too
    assert model.lora


def test_quantize_refusals(tiny_dir, tmp_path):
    base = str(tiny_dir / "tiny-llama")
    data = tmp_path / "sft.jsonl"
    with open(default_data("sft"), encoding="utf-8") as f:
        data.write_text("".join(next(f) for _ in range(4)), encoding="utf-8")
    common = ["--model", base, "--data", str(data), "--steps", "1", "--eval-every", "0"]
    result = invoke(
        "sft", *common, "--backend", "torch", "--quantize", "4", "--output", str(tmp_path / "t")
    )
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bitsandbytes on a CUDA GPU" in errors[0], result.output
    assert result.output.strip().splitlines()[-1] == errors[0]  # the data was read first
    assert not (tmp_path / "t").exists()
    result = invoke("sft", *common, "--full", "--quantize", "8", "--output", str(tmp_path / "f"))
    assert result.exit_code == 2 and "--quantize" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1  # refused before anything is read
    result = invoke("sft", *common, "--quantize", "3")
    assert result.exit_code == 2
