"""The PEFT adapter format: round trip, init, and clear errors for adapters we cannot use."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlxpost import adapters
from mlxpost.backend import LoraConfig


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
