"""Reading model directories of every supported architecture, checked against transformers.

mlxpost/model_dir.py states each family's tensors, defaults and rope settings in tables of its
own (it runs before any framework is imported); here they meet transformers' modules and
config classes, so a wrong table entry fails: expected_shapes against the tensors of each tiny
checkpoint and of models built from configs that leave sizes to the defaults, rope_settings
against transformers' rope_parameters in both config.json layouts. Options mlxpost does not
implement are refused at read_config with one line. The torch backend's choices per
architecture (sdpa, the head path of logits_and_scores, `base_model`) are checked on the tiny
models with a left-padded batch and per-row positions.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from mlxpost.errors import UserError
from mlxpost.model_dir import (
    FAMILIES,
    SUPPORTED_ARCHITECTURES,
    expected_shapes,
    normalise_name,
    read_config,
    read_safetensors_header,
    rope_settings,
    tied_embeddings,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ARCHS = SUPPORTED_ARCHITECTURES
DECODERS = tuple(FAMILIES)  # every architecture but GPT-2
F32_RTOL = 1e-5


def tiny(tiny_dir, arch: str) -> str:
    return str(tiny_dir / f"tiny-{arch}")


def config_of(path: str) -> dict:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def copy_with_config(source: str, target, config: dict) -> str:
    """A copy of a checkpoint directory with config.json replaced."""
    shutil.copytree(source, target)
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


def present(arch: str, shapes: dict, tied: bool) -> dict:
    """name -> shape of the tensors a checkpoint holds (a tied head is not saved)."""
    shapes = {normalise_name(arch, k): tuple(v) for k, v in shapes.items()}
    shapes.pop(None, None)
    if tied:
        shapes.pop("lm_head.weight", None)
    return shapes


# --------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_checkpoint_is_read_and_its_tensors_are_expected(arch, tiny_dir):
    path = tiny(tiny_dir, arch)
    config = read_config(path)
    header = read_safetensors_header(os.path.join(path, "model.safetensors"))
    expected = {k: shape for k, (shape, _) in expected_shapes("config.json", config).items()}
    tied = tied_embeddings(config)
    assert present(arch, expected, tied) == present(
        arch, {k: s for k, (_, s) in header.items()}, tied
    )


def config_variants(arch: str, built: dict) -> dict[str, dict]:
    """config.json variants: as built; with the keys transformers fills in left out (32 heads,
    which every family's default num_key_value_heads divides; no rope, which sets no shape);
    with every bias option on and the head's tying flipped."""
    left_out = ("head_dim", "num_key_value_heads", "tie_word_embeddings", "attention_bias")
    left_out += ("mlp_bias", "n_inner", "rope_parameters")
    defaults = {k: v for k, v in built.items() if k not in left_out}
    defaults["n_head" if arch == "gpt2" else "num_attention_heads"] = 32
    flipped = {
        **built,
        "attention_bias": True,
        "mlp_bias": True,
        "tie_word_embeddings": not built.get("tie_word_embeddings", True),
    }
    return {"built": built, "defaults": defaults, "biases-and-tying": flipped}


@pytest.mark.parametrize("variant", ["built", "defaults", "biases-and-tying"])
@pytest.mark.parametrize("arch", ARCHS)
def test_expected_shapes_are_those_of_the_transformers_model(arch, variant, tiny_dir):
    """The model transformers builds from a config.json holds exactly the tensors
    expected_shapes lists for it, defaults included (built on the meta device: no memory)."""
    config = config_variants(arch, config_of(tiny(tiny_dir, arch)))[variant]
    values = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    hf_config = transformers.AutoConfig.for_model(arch, **values)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert tied_embeddings(config) == bool(hf_config.tie_word_embeddings)
    tied = tied_embeddings(config)
    expected = {k: shape for k, (shape, _) in expected_shapes("config.json", config).items()}
    assert present(arch, expected, tied) == present(arch, actual, tied)


# --------------------------------------------------------------------------- rope


def old_layout(config: dict) -> dict:
    """A transformers-5 config.json (rope_parameters) in the layout of transformers 4."""
    from mlxpost.merge import old_rope_layout

    keys = old_rope_layout(config)
    assert keys, "this config has a rope the old layout can state"
    return {**{k: v for k, v in config.items() if k != "rope_parameters"}, **keys}


HAND_WRITTEN = {
    # As Hub checkpoints saved by transformers 4 state them.
    "llama-3.1": {
        "model_type": "llama",
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    },
    "qwen2-no-theta": {"model_type": "qwen2", "rope_scaling": None},
    "phi3-type-key": {
        "model_type": "phi3",
        "original_max_position_embeddings": 64,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
    },
    "gemma3-unscaled": {
        "model_type": "gemma3_text",
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": None,
    },
    "gemma3-defaults": {"model_type": "gemma3_text"},
    "mistral-type-key": {
        "model_type": "mistral",
        "rope_scaling": {"type": "linear", "factor": 2.0},
    },
}
SIZES = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def rope_configs(tiny_dir) -> list[tuple[str, dict]]:
    cases = []
    for arch in DECODERS:
        built = config_of(tiny(tiny_dir, arch))
        cases.append((f"{arch}-new-layout", built))
        cases.append((f"{arch}-old-layout", old_layout(built)))
    for name, config in HAND_WRITTEN.items():
        cases.append((name, {**SIZES, "head_dim": 16, **config}))
    return cases


def comparable(rope: dict) -> dict:
    """A rope dict without the old name of its type (transformers keeps it, unused), its
    partial_rotary_factor stated (transformers' Phi-3 states the default, 1)."""
    return {"partial_rotary_factor": 1.0, **{k: v for k, v in rope.items() if k != "type"}}


def test_rope_settings_read_both_layouts_as_transformers_does(tiny_dir):
    for name, config in rope_configs(tiny_dir):
        ours = rope_settings("config.json", config)
        values = {
            k: v for k, v in config.items() if k not in ("model_type", "transformers_version")
        }
        theirs = transformers.AutoConfig.for_model(config["model_type"], **values).rope_parameters
        if config["model_type"] == "gemma3_text":
            ours = {k: comparable(v) for k, v in ours.items()}
            theirs = {k: comparable(v) for k, v in theirs.items()}
        else:
            ours, theirs = comparable(ours), comparable(theirs)
        assert ours == theirs, name


@pytest.mark.parametrize(
    "arch, change, where, rope_type, supported",
    [
        ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling", "yarn", "default, linear, llama3, longrope"),
        ("mistral", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling", "dynamic", "default, linear, llama3, longrope"),
        ("qwen2", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}}, "rope_parameters", "dynamic", "default, linear, llama3, longrope"),
        ("qwen3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "original_max_position_embeddings": 64}}, "rope_parameters", "yarn", "default, linear, llama3, longrope"),
        ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "proportional", "rope_theta": 1e6}, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "rope_parameters.full_attention", "proportional", "default, linear, llama3, longrope"),
        ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}, "sliding_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}}, "rope_parameters.sliding_attention", "yarn", "default, linear, llama3, longrope"),
        ("gemma3_text", {"rope_parameters": None, "rope_scaling": {"rope_type": "dynamic", "factor": 8.0}}, "rope_scaling", "dynamic", "default, linear, llama3, longrope"),
        ("phi3", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_parameters", "linear", "default, longrope"),
        ("phi3", {"rope_parameters": None, "rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling", "yarn", "default, longrope"),
        ("phi3", {"rope_parameters": None, "rope_scaling": {"type": "su", "short_factor": [1.0] * 6, "long_factor": [1.0] * 6}}, "rope_scaling", "su", "default, longrope"),
        ("gemma2", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "rope_parameters", "yarn", "default, linear, llama3, longrope"),
    ],
)  # fmt: skip
def test_unimplemented_rope_type_is_refused(
    arch, change, where, rope_type, supported, tiny_dir, tmp_path
):
    config = {**config_of(tiny(tiny_dir, arch)), **change}
    path = copy_with_config(tiny(tiny_dir, arch), tmp_path / "model", config)
    with pytest.raises(UserError) as err:
        read_config(path)
    message = str(err.value)
    assert err.value.exit_code == 2
    assert message.startswith(os.path.join(path, "config.json") + ": "), message
    assert f"rope type {rope_type!r} ({where}) is not supported for {arch}" in message
    assert message.endswith(f"supported: {supported}"), message


@pytest.mark.parametrize(
    "arch, change, message",
    [
        ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention is not supported"),
        ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention is not supported"),
        ("gemma3_text", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping is not supported for gemma3_text"),
        ("gemma3_text", {"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_parameters of gemma3_text must be keyed by layer type"),
        ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}}, "rope_parameters.low_freq_factor must be a positive number for rope type 'llama3', got null"),
        ("qwen3", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "rope_parameters.factor must be a positive number for rope type 'linear', got null"),
        ("mistral", {"rope_parameters": None, "rope_theta": "big"}, "rope_theta must be a positive number for rope type 'default', got \"big\""),
        ("phi3", {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 6, "rope_theta": 1e4, "partial_rotary_factor": 0.75}}, "rope_parameters.short_factor must be a list of 6 positive numbers (one per rotary frequency pair), got 8 values"),
        ("qwen2", {"rope_scaling": "linear"}, "rope_scaling must be a JSON object, got \"linear\""),
    ],
)  # fmt: skip
def test_unimplemented_options_are_refused(arch, change, message, tiny_dir, tmp_path):
    config = {**config_of(tiny(tiny_dir, arch)), **change}
    path = copy_with_config(tiny(tiny_dir, arch), tmp_path / "model", config)
    with pytest.raises(UserError, match=re.escape(message)) as err:
        read_config(path)
    assert str(err.value).startswith(os.path.join(path, "config.json") + ": ")
    assert "\n" not in str(err.value)


def test_cli_refuses_unimplemented_rope_with_exit_status_2(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from mlxpost.cli import main

    config = {
        **config_of(tiny(tiny_dir, "llama")),
        "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4},
    }
    path = copy_with_config(tiny(tiny_dir, "llama"), tmp_path / "model", config)
    result = CliRunner().invoke(main, ["eval", "--model", path, "--limit", "1"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "rope type 'yarn'" in lines[-1], result.output


# --------------------------------------------------------------------------- bad tensors


def rewrite_tensors(source: str, target, change) -> str:
    """A copy of a checkpoint whose tensors `change(dict)` edits in place (numpy, float32)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, target)
    tensors = load_file(os.path.join(source, "model.safetensors"))
    change(tensors)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return str(target)


def drop(name):
    return lambda tensors: tensors.pop(name)


def reshape(name, shape):
    return lambda tensors: tensors.update({name: np.zeros(shape, np.float32)})


def add(name, shape):
    return reshape(name, shape)


@pytest.mark.parametrize(
    "arch, change, message",
    [
        ("qwen3", drop("model.layers.1.self_attn.k_norm.weight"), "no tensor model.layers.1.self_attn.k_norm.weight, which config.json (head_dim 32) describes"),
        ("qwen3", reshape("model.layers.0.self_attn.q_norm.weight", (16,)), "model.layers.0.self_attn.q_norm.weight has shape (16,), but config.json (head_dim 32) makes it (32,)"),
        ("qwen2", drop("model.layers.0.self_attn.v_proj.bias"), "no tensor model.layers.0.self_attn.v_proj.bias, which config.json (model_type qwen2, num_key_value_heads 2, head_dim 16 (default), hidden_size 64) describes"),
        ("qwen2", add("model.layers.0.self_attn.o_proj.bias", (64,)), "holds model.layers.0.self_attn.o_proj.bias, which a qwen2 model with num_hidden_layers 3 (config.json) does not have"),
        ("llama", drop("model.layers.1.mlp.up_proj.bias"), "no tensor model.layers.1.mlp.up_proj.bias, which config.json (mlp_bias true, intermediate_size 128, hidden_size 64) describes"),
        ("llama", drop("lm_head.weight"), "no tensor lm_head.weight, which config.json (tie_word_embeddings false) describes"),
        ("mistral", reshape("model.layers.0.self_attn.o_proj.weight", (64, 64)), "model.layers.0.self_attn.o_proj.weight has shape (64, 64), but config.json (num_attention_heads 4, head_dim 24, hidden_size 64) makes it (64, 96)"),
        ("gemma3_text", drop("model.layers.2.pre_feedforward_layernorm.weight"), "no tensor model.layers.2.pre_feedforward_layernorm.weight, which config.json (hidden_size 64) describes"),
        ("phi3", reshape("model.layers.0.self_attn.qkv_proj.weight", (192, 64)), "model.layers.0.self_attn.qkv_proj.weight has shape (192, 64), but config.json (num_attention_heads 4, num_key_value_heads 2, head_dim 16 (default), hidden_size 64) makes it (128, 64)"),
        ("phi3", reshape("model.layers.1.mlp.gate_up_proj.weight", (128, 64)), "model.layers.1.mlp.gate_up_proj.weight has shape (128, 64), but config.json (intermediate_size 128, hidden_size 64) makes it (256, 64)"),
        ("phi3", add("model.layers.0.mlp.gate_proj.weight", (128, 64)), "holds model.layers.0.mlp.gate_proj.weight, which a phi3 model with num_hidden_layers 2 (config.json) does not have"),
    ],
)  # fmt: skip
def test_bad_tensors_are_named_in_one_line(arch, change, message, tiny_dir, tmp_path):
    path = rewrite_tensors(tiny(tiny_dir, arch), tmp_path / "model", change)
    with pytest.raises(UserError, match=re.escape(message)) as err:
        read_config(path)
    assert str(err.value).startswith(os.path.join(path, "model.safetensors") + ": ")
    assert "\n" not in str(err.value)


def test_untied_default_is_named_when_config_json_leaves_it_out(tiny_dir, tmp_path):
    """Llama's config class unties the head by default, so a checkpoint without lm_head and
    without tie_word_embeddings is incomplete."""
    source = tiny(tiny_dir, "llama")
    config = {k: v for k, v in config_of(source).items() if k != "tie_word_embeddings"}
    path = copy_with_config(source, tmp_path / "model", config)
    read_config(path)  # the head is there
    os.remove(os.path.join(path, "model.safetensors"))
    rewrite_tensors(source, tmp_path / "headless", drop("lm_head.weight"))
    shutil.copy(tmp_path / "headless" / "model.safetensors", path)
    with pytest.raises(UserError, match=r"tie_word_embeddings false, the llama default"):
        read_config(path)


# --------------------------------------------------------------------------- torch backend


def left_padded_batch(seed: int = 0, length: int = 20):
    """Three rows of `length` tokens, two of them left padded, longer than every tiny sliding
    window (8 or 12)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 320, size=(3, length))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    return np.where(mask == 1, ids, 0), mask


def report(what, actual, expected, rtol=F32_RTOL):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    diff = np.abs(actual - expected).max()
    atol = rtol * max(1.0, float(np.abs(expected).max()))
    print(f"{what}: max abs diff {diff:.3e}, atol {atol:.3e}")
    assert diff <= atol, f"{what}: max abs diff {diff:.3e} > atol {atol:.3e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_torch_backend_attention_matches_eager_with_left_padding(arch, tiny_dir):
    """The torch backend's kernel (sdpa on all but Gemma-2) gives transformers' eager logits to
    float32 rounding on real tokens, and finite logits on padding."""
    from torch_backend.backend import TorchBackend
    from torch_backend.modeling import ATTENTION, positions

    backend = TorchBackend(device="cpu")
    model = backend.load_model(tiny(tiny_dir, arch))
    assert model.module.config._attn_implementation == ATTENTION.get(arch, "sdpa")
    ids, mask = left_padded_batch()
    ours = backend.token_logits(model, ids, mask)
    eager = transformers.AutoModelForCausalLM.from_pretrained(
        tiny(tiny_dir, arch), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
        reference = eager(
            input_ids=ids_t, attention_mask=mask_t, position_ids=positions(mask_t), use_cache=False
        ).logits.numpy()
    real = mask.astype(bool)
    assert np.all(np.isfinite(ours))
    report(f"{arch} {ATTENTION.get(arch, 'sdpa')} vs eager", ours[real], reference[real])


@pytest.mark.parametrize("arch", ARCHS)
def test_torch_backend_head_path_matches_the_model_forward(arch, tiny_dir):
    """logits_and_scores runs `base_model` then lm_head and the final soft-cap itself; its
    logits are the model's own forward's (Gemma-2 and Gemma-3 cap theirs)."""
    from torch_backend.backend import TorchBackend, TorchForward

    backend = TorchBackend(device="cpu")
    model = backend.load_model(tiny(tiny_dir, arch))
    backend.attach_scalar_head(model, seed=0)
    ids, mask = left_padded_batch(seed=1)
    ids_t, mask_t = backend.tensor(ids), backend.tensor(mask)
    forward = TorchForward(model)
    with torch.no_grad():
        logits, scores = forward.logits_and_scores(ids_t, mask_t)
        direct = forward.logits(ids_t, mask_t)
    assert scores.shape == ids.shape
    hidden = backend.hidden_states(model, ids, mask)
    assert hidden.shape == (*ids.shape, model.module.config.hidden_size)
    real = mask.astype(bool)
    report(f"{arch} head path vs forward", logits.numpy()[real], direct.numpy()[real], rtol=1e-6)
