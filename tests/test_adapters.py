"""The PEFT adapter format: round trip, init, and clear errors for adapters we cannot use."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlxpost import adapters
from mlxpost.backend import LoraConfig
from mlxpost.parity import parity_lora_init


def write_adapter(directory, **config_overrides):
    weights = {
        "transformer.h.0.attn.c_attn.lora_A.weight": np.ones((2, 8), np.float32),
        "transformer.h.0.attn.c_attn.lora_B.weight": np.zeros((24, 2), np.float32),
    }
    adapters.save_adapter(
        str(directory), weights, LoraConfig(rank=2, alpha=4.0), ("c_attn",), "gpt2", "base"
    )
    if config_overrides:
        path = directory / adapters.CONFIG_FILE
        config = json.loads(path.read_text())
        config.update(config_overrides)
        path.write_text(json.dumps(config))
    return weights


def test_round_trip_uses_peft_names(tmp_path):
    weights = write_adapter(tmp_path)
    config = json.loads((tmp_path / adapters.CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 4.0
    assert config["fan_in_fan_out"] is True  # GPT-2 Conv1D
    from safetensors.numpy import load_file

    keys = set(load_file(str(tmp_path / adapters.WEIGHTS_FILE)))
    assert keys == {"base_model.model." + k for k in weights}
    cfg, loaded = adapters.load_adapter(str(tmp_path))
    assert cfg.rank == 2 and cfg.scale == 2.0 and cfg.targets == ("c_attn",)
    for name, value in weights.items():
        np.testing.assert_array_equal(loaded[name], value)
    assert not list(tmp_path.glob("*.tmp")), "temporary files left behind"


def test_init_is_peft_default_and_deterministic():
    a, b = adapters.init_lora_weights("x.q_proj", 64, 32, 4, seed=1)
    a2, _ = adapters.init_lora_weights("x.q_proj", 64, 32, 4, seed=1)
    other, _ = adapters.init_lora_weights("x.k_proj", 64, 32, 4, seed=1)
    assert a.shape == (4, 64) and b.shape == (32, 4)
    assert np.all(b == 0) and np.abs(a).max() <= 1 / np.sqrt(64)
    np.testing.assert_array_equal(a, a2)
    assert not np.array_equal(a, other)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"use_dora": True}, "use_dora"),
        ({"peft_type": "IA3"}, "not LORA"),
        ({"target_modules": ".*attn"}, "regex"),
    ],
)
def test_unsupported_adapters_are_named(tmp_path, override, message):
    write_adapter(tmp_path, **override)
    with pytest.raises(adapters.AdapterError, match=message):
        adapters.load_adapter(str(tmp_path))


def test_missing_adapter_files(tmp_path):
    with pytest.raises(adapters.AdapterError, match="adapter_config.json: not found"):
        adapters.load_adapter(str(tmp_path))


def test_adapter_that_does_not_fit():
    expected = {"a.lora_A.weight": np.zeros((2, 8))}
    with pytest.raises(adapters.AdapterError, match="missing"):
        adapters.check_adapter_fits("dir", expected, {"b.lora_A.weight": np.zeros((2, 8))})
    with pytest.raises(adapters.AdapterError, match="shape"):
        adapters.check_adapter_fits("dir", expected, {"a.lora_A.weight": np.zeros((4, 8))})


def test_targets_match_last_component():
    paths = [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_proj",
    ]
    assert adapters.select_modules(paths, ["c_proj"]) == paths[1:]
    with pytest.raises(adapters.AdapterError, match="no module matches"):
        adapters.select_modules(paths, ["q_proj"])


# --------------------------------------------------------------------------- every architecture


def report(what, actual, expected, rtol=1e-5):
    """Assert |actual - expected| <= rtol * max(1, max|expected|) (float32 rounding noise)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    diff = np.abs(actual - expected).max()
    atol = rtol * max(1.0, float(np.abs(expected).max()))
    print(f"{what}: max abs diff {diff:.3e}, atol {atol:.3e}")
    assert diff <= atol, f"{what}: max abs diff {diff:.3e} > atol {atol:.3e}"
    return diff


def trained_adapter(backend, model, directory, seed=0):
    """Save the default-target adapter of mlxpost's torch backend with random, non-zero lora_B
    (what training makes of the zero init), standing in for a trained one."""
    from mlxpost.backend import DEFAULT_LORA_TARGETS

    backend.attach_lora(model, LoraConfig(rank=4, alpha=8.0), seed=seed)
    assert model.lora_targets == DEFAULT_LORA_TARGETS[model.arch]
    backend.set_parameters(model, parity_lora_init(backend.parameters(model, True), seed))
    backend.save_adapter(model, str(directory))
    return str(directory)


@pytest.mark.parametrize(
    "arch", ["gpt2", "gemma2", "llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"]
)
def test_adapter_of_every_architecture_gives_its_logits_in_peft(arch, tiny_dir, tmp_path):
    """An adapter mlxpost saves loads in peft over transformers' model and gives the logits
    the torch backend gives with it: a left-padded batch with per-row positions, longer than
    the tiny sliding windows."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from mlxpost.backend import DEFAULT_LORA_TARGETS
    from torch_backend.backend import TorchBackend
    from torch_backend.modeling import positions

    path = str(tiny_dir / f"tiny-{arch}")
    backend = TorchBackend(device="cpu")
    model = backend.load_model(path)
    adapter = trained_adapter(backend, model, tmp_path / "adapter")
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 320, size=(3, 20))
    mask = np.ones_like(ids)
    mask[1, :4], mask[2, :9] = 0, 0
    ids = np.where(mask == 1, ids, 0)
    ours = backend.token_logits(model, ids, mask)

    config = json.loads((tmp_path / "adapter" / adapters.CONFIG_FILE).read_text())
    assert config["target_modules"] == sorted(DEFAULT_LORA_TARGETS[arch])

    base = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    targeted = {
        name
        for name, _ in base.named_modules()
        if name.rsplit(".", 1)[-1] in DEFAULT_LORA_TARGETS[arch]
    }
    _, weights = adapters.load_adapter(adapter)  # an A and a B per targeted module
    assert {name.rpartition(".lora_")[0] for name in weights} == targeted
    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
    inputs = dict(input_ids=ids_t, attention_mask=mask_t, position_ids=positions(mask_t))
    with torch.no_grad():
        without = base(**inputs).logits.numpy()
        wrapped = peft.PeftModel.from_pretrained(base, adapter).eval()
        theirs = wrapped(**inputs).logits.numpy()
    real = mask.astype(bool)
    report(f"{arch} adapter: torch backend vs peft", ours[real], theirs[real])
    # The adapter must matter, or the comparison proves nothing.
    assert np.abs(theirs - without)[real].max() > 1e-2 * max(1.0, np.abs(theirs).max())
