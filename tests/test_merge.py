"""`mlxpost merge` / `soup`: merged checkpoints compute what base + adapter computes.

Merges fold an adapter saved by mlxpost's torch backend (random, non-zero lora_B) into the
tiny random checkpoint of every architecture; the result must give, in transformers, in
mlxpost's MLX models and in mlx-lm, the logits of the torch backend (and of peft) with the
adapter. Other adapters are made by PEFT itself. Logits are compared with atol = 1e-5 *
max(1, max|reference logit|), float32 rounding noise; run with -s to see the measured
differences.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mlxpost import merge as merging
from mlxpost.adapters import AdapterError, load_adapter, save_adapter
from mlxpost.backend import DEFAULT_LORA_TARGETS, LoraConfig, get_backend
from mlxpost.errors import UserError
from mlxpost.model_dir import SUPPORTED_ARCHITECTURES
from mlxpost.parity import parity_lora_init

ARCHS = SUPPORTED_ARCHITECTURES
F32_RTOL = 1e-5
# Longer than the tiny sliding windows (8 or 12), so windowed layers see the merged weights too.
IDS = np.random.default_rng(0).integers(0, 320, size=(2, 16))


def report(what, actual, expected, rtol=F32_RTOL):
    """Assert |actual - expected| <= rtol * max(1, max|expected|); print the measured diff."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    diff = np.abs(actual - expected).max()
    atol = rtol * max(1.0, float(np.abs(expected).max()))
    print(f"{what}: max abs diff {diff:.3e}, atol {atol:.3e}")
    assert diff <= atol, f"{what}: max abs diff {diff:.3e} > atol {atol:.3e}"
    return diff


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return {arch: str(tiny_dir / f"tiny-{arch}") for arch in ARCHS}


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32
    ).eval()


def logits_of(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def make_adapter(base_dir, output, arch, rank=4, alpha=8, seed=0):
    """A PEFT adapter with PEFT's random lora_A and a random, non-zero lora_B."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(DEFAULT_LORA_TARGETS[arch]),
        fan_in_fan_out=arch == "gpt2",
    )
    model = peft.get_peft_model(hf_model(base_dir), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    model.save_pretrained(str(output))
    return str(output)


def mlxpost_adapter(base_dir, output, seed=0):
    """The default-target adapter of mlxpost's torch backend, with a random, non-zero lora_B
    as training leaves it; returns (adapter directory, the backend's logits of IDS with it)."""
    backend = get_backend("torch")
    model = backend.load_model(base_dir)
    backend.attach_lora(model, LoraConfig(rank=4, alpha=8.0), seed=seed)
    backend.set_parameters(model, parity_lora_init(backend.parameters(model, True), seed))
    backend.save_adapter(model, str(output))
    return str(output), backend.token_logits(model, IDS, np.ones_like(IDS))


def peft_logits(base_dir, adapter_dir):
    return logits_of(peft.PeftModel.from_pretrained(hf_model(base_dir), adapter_dir).eval())


def tensors_of(path):
    return load_file(os.path.join(path, merging.MERGED_FILE))


@pytest.fixture(scope="module", params=ARCHS)
def merged(request, tiny, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(f"merged-{arch}")
    adapter, reference = mlxpost_adapter(tiny[arch], root / "adapter")
    output = merging.merge_adapter(tiny[arch], adapter, str(root / "merged"))
    return {
        "arch": arch,
        "base": tiny[arch],
        "adapter": adapter,
        "output": output,
        "reference": reference,  # the torch backend's, with the adapter
    }


# --------------------------------------------------------------------------- merge


def test_merged_checkpoint_matches_the_adapter_in_transformers(merged):
    reference = merged["reference"]
    ours = logits_of(hf_model(merged["output"]))
    report(f"{merged['arch']} merged (transformers) vs torch backend + adapter", ours, reference)
    report(
        f"{merged['arch']} merged vs PEFT + adapter (transformers)",
        ours,
        peft_logits(merged["base"], merged["adapter"]),
    )
    # The adapter must matter, or the comparisons above prove nothing.
    moved = np.abs(reference - logits_of(hf_model(merged["base"]))).max()
    assert moved > 1e3 * F32_RTOL * max(1.0, np.abs(reference).max())


def test_merged_checkpoint_matches_the_adapter_in_mlx(merged):
    mx = pytest.importorskip("mlx.core")
    from mlxpost.mlx_backend.models import ARCHITECTURES
    from mlxpost.mlx_backend.models.common import load_model

    if merged["arch"] not in ARCHITECTURES:
        pytest.skip(f"mlxpost has no MLX {merged['arch']} model")
    model = load_model(merged["output"])
    logits = model.lm_logits(model(mx.array(IDS)))
    report(
        f"{merged['arch']} merged in mlx vs torch backend + adapter",
        np.array(logits),
        merged["reference"],
    )


def test_merged_directory_keeps_layout_and_files(merged):
    base, output = merged["base"], merged["output"]
    assert set(tensors_of(output)) == set(tensors_of(base))
    with safe_open(os.path.join(output, merging.MERGED_FILE), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    for name in ("generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (Path(output) / name).read_bytes() == (Path(base) / name).read_bytes()
    # config.json is copied, with transformers 5's rope_parameters also stated in the old
    # layout (rope_theta, rope_scaling) where the base states it in the new one only.
    config = json.loads((Path(base) / "config.json").read_text())
    old_layout = merging.old_rope_layout(config)
    if old_layout:
        assert json.loads((Path(output) / "config.json").read_text()) == {**config, **old_layout}
    else:
        assert (Path(output) / "config.json").read_bytes() == (
            Path(base) / "config.json"
        ).read_bytes()
    leftovers = [p for p in os.listdir(Path(output).parent) if ".tmp-" in p]
    assert not leftovers, leftovers


def test_merge_into_checkpoint_without_body_prefix(merged, tmp_path):
    """Original GPT-2 checkpoints lack `transformer.`, base-model checkpoints `model.`."""
    prefix = merging.BODY_PREFIXES[merged["arch"]]
    base = tmp_path / "base"
    shutil.copytree(merged["base"], base)
    tensors = tensors_of(str(base))
    save_file(
        {k.removeprefix(prefix): v for k, v in tensors.items()},
        str(base / merging.MERGED_FILE),
        metadata={"format": "pt"},
    )
    output = merging.merge_adapter(str(base), merged["adapter"], str(tmp_path / "out"))
    ours, expected = tensors_of(output), tensors_of(merged["output"])
    assert set(ours) == {k.removeprefix(prefix) for k in expected}
    for key, value in expected.items():
        assert torch.equal(ours[key.removeprefix(prefix)], value), key


@pytest.mark.parametrize("io", ["torch", "mlx"])
def test_merge_bfloat16_checkpoint(io, tiny, tmp_path, monkeypatch):
    if io == "mlx":
        pytest.importorskip("mlx.core")
        monkeypatch.setattr(merging, "tensor_io", lambda: get_backend("mlx"))
    base = tmp_path / "base"
    shutil.copytree(tiny["gpt2"], base)
    tensors = {k: v.to(torch.bfloat16) for k, v in tensors_of(str(base)).items()}
    save_file(tensors, str(base / merging.MERGED_FILE), metadata={"format": "pt"})
    adapter = make_adapter(tiny["gpt2"], tmp_path / "adapter", "gpt2")
    ours = tensors_of(merging.merge_adapter(str(base), adapter, str(tmp_path / "out")))

    lora = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    module = "transformer.h.1.attn.c_proj"  # square: only the name says it is transposed
    a, b = (lora[f"base_model.model.{module}.lora_{p}.weight"].double() for p in "AB")
    expected = (tensors[f"{module}.weight"].double() + 2.0 * (b @ a).T).to(torch.bfloat16)
    assert ours[f"{module}.weight"].dtype == torch.bfloat16
    # mlx rounds float64 -> float32 -> bfloat16: at most one bfloat16 step off.
    torch.testing.assert_close(
        ours[f"{module}.weight"], expected, rtol=0 if io == "torch" else 2**-7, atol=0
    )
    assert torch.equal(ours["transformer.ln_f.weight"], tensors["transformer.ln_f.weight"])


def test_merge_errors_name_the_problem(tiny, tmp_path):
    gemma_adapter = make_adapter(tiny["gemma2"], tmp_path / "gemma-adapter", "gemma2")
    with pytest.raises(UserError, match=r"module model\.layers\.0\.\S+ has no weight in"):
        merging.merge_adapter(tiny["gpt2"], gemma_adapter, str(tmp_path / "out"))

    wrong = tmp_path / "wrong-shape"  # for a GPT-2 with 32-wide embeddings, not 64
    weights = {
        "transformer.h.0.attn.c_attn.lora_A.weight": np.ones((2, 32), np.float32),
        "transformer.h.0.attn.c_attn.lora_B.weight": np.ones((96, 2), np.float32),
    }
    save_adapter(str(wrong), weights, LoraConfig(rank=2, alpha=4.0), ("c_attn",), "gpt2", "x")
    with pytest.raises(UserError, match=r"has shape \(32, 96\).*transformer.h.0.attn.c_attn"):
        merging.merge_adapter(tiny["gpt2"], str(wrong), str(tmp_path / "out"))

    with pytest.raises(AdapterError, match="adapter_config.json: not found"):
        merging.merge_adapter(tiny["gpt2"], str(tmp_path / "nope"), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["gemma-adapter", "wrong-shape"]


@pytest.mark.parametrize(
    "shapes, config, message",
    [
        ({"A": (2, 64)}, {}, "needs both lora_A and lora_B"),
        ({"A": (2, 64), "B": (192, 3)}, {}, "expected rank r=2"),
        ({"A": (2, 64), "B": (192, 2)}, {"alpha_pattern": {"c_attn": 8}}, "alpha_pattern"),
    ],
)
def test_unsupported_adapters(shapes, config, message, tiny, tmp_path):
    adapter = tmp_path / "adapter"
    weights = {
        f"transformer.h.0.attn.c_attn.lora_{part}.weight": np.ones(shape, np.float32)
        for part, shape in shapes.items()
    }
    save_adapter(str(adapter), weights, LoraConfig(rank=2, alpha=4.0), ("c_attn",), "gpt2", "x")
    config_path = adapter / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **config}))
    with pytest.raises(UserError, match=message):
        merging.merge_adapter(tiny["gpt2"], str(adapter), str(tmp_path / "out"))


def test_existing_output_needs_force(merged, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty; pass --force"):
        merging.merge_adapter(merged["base"], merged["adapter"], str(output))
    assert (output / "keep.txt").exists()
    merging.merge_adapter(merged["base"], merged["adapter"], str(output), force=True)
    assert not (output / "keep.txt").exists()
    assert tensors_of(str(output)).keys() == tensors_of(merged["output"]).keys()


# --------------------------------------------------------------------------- mlx-lm

# Architectures mlx-lm opens, each with (what of its tiny checkpoint mlx-lm does not implement,
# turned off here; the longest sequence mlx-lm computes as transformers does). mlx-lm leaves
# sliding windows out of Mistral, Qwen-2, Phi-3 and Gemma-2 (not Gemma-3): sequences no longer
# than their tiny windows (8; Phi-3's 12). Its Qwen-3 has no attention biases (it refuses the
# checkpoint), its Gemma-3 no final logit soft-cap, and its Phi-3 always rotates with the
# long factors, which transformers uses only once the sequence passes
# original_max_position_embeddings (hence 8 here, with sequences of 12).
MLX_LM = {
    "llama": ({}, 16),
    "mistral": ({}, 8),
    "qwen2": ({}, 8),
    "qwen3": ({"attention_bias": False}, 16),
    "gemma3_text": ({"final_logit_softcapping": None}, 16),
    "phi3": ({"original_max_position_embeddings": 8}, 12),
    "gemma2": ({}, 8),
}


@pytest.mark.parametrize("arch", MLX_LM)
def test_merged_checkpoint_opens_in_mlx_lm(arch, tiny_builder, tmp_path):
    """mlx_lm.load opens a merged checkpoint and computes transformers' logits (mlx-lm takes
    no padding mask: one unpadded batch). The base is as transformers 5 saves it, its rope
    in rope_parameters only, which mlx-lm does not read: the merge states it the old way too.
    With -s, the difference on a sequence longer than the window is printed."""
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    overrides, length = MLX_LM[arch]
    base = tiny_builder.build(arch, str(tmp_path / "base"), **overrides)
    assert "rope_theta" not in json.loads(Path(base, "config.json").read_text())
    adapter, _ = mlxpost_adapter(base, tmp_path / "adapter")
    output = merging.merge_adapter(base, adapter, str(tmp_path / "merged"))
    model, _ = mlx_lm.load(output)
    reference = hf_model(output)
    rng = np.random.default_rng(1)
    for size in (length, 24):
        ids = rng.integers(2, 320, size=(2, size))
        with torch.no_grad():
            expected = reference(torch.tensor(ids)).logits.numpy()
        logits = np.array(model(mx.array(ids)).astype(mx.float32))
        if size == length:
            report(f"{arch} merged: mlx-lm vs transformers, {size} tokens", logits, expected)
        else:
            diff = np.abs(logits - expected).max()
            print(f"{arch} merged: mlx-lm vs transformers, {size} tokens: max abs diff {diff:.3e}")


# --------------------------------------------------------------------------- soup


@pytest.fixture(scope="module")
def gpt2_adapters(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(tiny["gpt2"], root / "a", "gpt2", seed=1),
        "b": make_adapter(tiny["gpt2"], root / "b", "gpt2", seed=2),
        "rank2": make_adapter(tiny["gpt2"], root / "rank2", "gpt2", rank=2, alpha=8, seed=3),
    }


def test_factor_soup_is_weighted_average_of_tensors(gpt2_adapters, tiny, tmp_path):
    inputs = [gpt2_adapters["a"], gpt2_adapters["b"]]
    output = merging.soup(inputs, str(tmp_path / "soup"), weights=[1.0, 3.0])
    _, ours = load_adapter(output)
    (_, first), (_, second) = load_adapter(inputs[0]), load_adapter(inputs[1])
    assert set(ours) == set(first)
    for name, value in ours.items():
        expected = 0.25 * first[name].astype(np.float64) + 0.75 * second[name]
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7)
    peft.PeftModel.from_pretrained(hf_model(tiny["gpt2"]), output)  # PEFT reads the result


def test_factor_soup_refuses_different_ranks(gpt2_adapters, tmp_path):
    inputs = [gpt2_adapters["a"], gpt2_adapters["rank2"]]
    with pytest.raises(UserError, match="rank 2 differs from .*rank 4.*--mode update"):
        merging.soup(inputs, str(tmp_path / "soup"))
    assert not os.listdir(tmp_path)


def test_update_soup_folds_exact_average_update(gpt2_adapters, tiny, tmp_path):
    inputs = [gpt2_adapters["a"], gpt2_adapters["rank2"]]  # ranks may differ in this mode
    output = merging.soup(
        inputs, str(tmp_path / "soup"), weights=[0.25, 0.75], mode="update", model_dir=tiny["gpt2"]
    )
    model = hf_model(tiny["gpt2"])
    state = {k: v.double() for k, v in model.state_dict().items()}
    for weight, adapter in zip((0.25, 0.75), inputs):
        config = json.loads(Path(adapter, "adapter_config.json").read_text())
        scale = config["lora_alpha"] / config["r"]
        lora = load_file(os.path.join(adapter, "adapter_model.safetensors"))
        for key in lora:
            if ".lora_A." in key:
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                b = lora[key.replace(".lora_A.", ".lora_B.")].double()
                state[f"{module}.weight"] += weight * scale * (b @ lora[key].double()).T
    model.load_state_dict({k: v.float() for k, v in state.items()})
    report("update soup vs weights merged by hand", logits_of(hf_model(output)), logits_of(model))


def test_checkpoint_soup_averages_every_tensor(tiny_builder, tiny, tmp_path):
    other = tiny_builder.build("gpt2", str(tmp_path / "other"), seed=1)
    output = merging.soup([tiny["gpt2"], other], str(tmp_path / "soup"), weights=[1.0, 3.0])
    first, second, ours = tensors_of(tiny["gpt2"]), tensors_of(other), tensors_of(output)
    assert set(ours) == set(first)
    for key, value in ours.items():
        expected = (0.25 * first[key].double() + 0.75 * second[key].double()).float()
        assert torch.equal(value, expected), key
    assert Path(output, "tokenizer.json").exists() and Path(output, "config.json").exists()
    hf_model(output)


@pytest.mark.parametrize(
    "case, message",
    [
        ("one input", "at least two inputs"),
        ("weights", "--weights has 3 values for 2 inputs"),
        ("negative", "non-negative"),
        ("mixed", "cannot mix adapters"),
        ("update without model", "--mode update needs --model"),
        ("mode on checkpoints", "apply to adapter soups only"),
    ],
)
def test_soup_input_errors(case, message, gpt2_adapters, tiny, tmp_path):
    a, b = gpt2_adapters["a"], gpt2_adapters["b"]
    kwargs = {
        "one input": dict(inputs=[a]),
        "weights": dict(inputs=[a, b], weights=[1, 2, 3]),
        "negative": dict(inputs=[a, b], weights=[-1, 2]),
        "mixed": dict(inputs=[a, tiny["gpt2"]]),
        "update without model": dict(inputs=[a, b], mode="update"),
        "mode on checkpoints": dict(inputs=[tiny["gpt2"], tiny["gpt2"]], mode="update"),
    }[case]
    with pytest.raises(UserError, match=message):
        merging.soup(output_dir=str(tmp_path / "out"), **kwargs)


# --------------------------------------------------------------------------- command line


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mlxpost.cli", *args], capture_output=True, text=True, timeout=300
    )


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ")
    for fragment in fragments:
        assert fragment in message, message


def test_cli_merge_missing_adapter(tiny, tmp_path):
    missing = str(tmp_path / "nope")
    result = run_cli(
        "merge", "--model", tiny["gpt2"], "--adapter", missing, "--output", str(tmp_path / "o")
    )
    assert_user_error(result, missing, "not found")


def test_cli_merge_existing_output_then_force(gpt2_adapters, tiny, tmp_path):
    (tmp_path / "file").write_text("x")
    args = ["merge", "--model", tiny["gpt2"], "--adapter", gpt2_adapters["a"]]
    args += ["--output", str(tmp_path)]
    assert_user_error(run_cli(*args), str(tmp_path), "--force")
    result = run_cli(*args, "--force")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path)


def test_cli_soup_mismatched_adapters(gpt2_adapters, tmp_path):
    result = run_cli(
        "soup", gpt2_adapters["a"], gpt2_adapters["rank2"], "--output", str(tmp_path / "o")
    )
    assert_user_error(result, gpt2_adapters["rank2"], "rank")


def test_cli_soup_bad_weights(gpt2_adapters, tmp_path):
    a, b = gpt2_adapters["a"], gpt2_adapters["b"]
    result = run_cli("soup", a, b, "--weights", "1,x", "--output", str(tmp_path / "o"))
    assert_user_error(result, "--weights", "numbers")
