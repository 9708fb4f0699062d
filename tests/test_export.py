"""`mlxpost export`: MLX model directories that mlx-lm opens, GGUF files that read back.

Exports fold an adapter saved by mlxpost's torch backend (random, non-zero lora_B) into a
tiny random checkpoint. MLX exports must give, in mlx-lm, the logits of the torch backend with
the adapter (which tests/test_merge.py shows the merged checkpoint gives in transformers),
within float32 rounding: atol = 1e-5 * max(1, max|reference logit|), on sequences no longer
than the sliding windows mlx-lm leaves out. GGUF exports are read back with gguf.GGUFReader:
every tensor is the merged checkpoint's, once llama.cpp's rotary row order and the output
type are undone. Run with -s to see the measured differences.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from click.testing import CliRunner
from safetensors.torch import load_file

from mlxpost import export as exporting
from mlxpost.backend import LoraConfig, get_backend
from mlxpost.cli import main
from mlxpost.errors import UserError
from mlxpost.merge import merge_adapter
from mlxpost.parity import parity_lora_init

F32_RTOL = 1e-5
RNG = np.random.default_rng(0)


def report(what, actual, expected, rtol=F32_RTOL):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    diff = np.abs(actual - expected).max()
    atol = rtol * max(1.0, float(np.abs(expected).max()))
    print(f"{what}: max abs diff {diff:.3e}, atol {atol:.3e}")
    assert diff <= atol, f"{what}: max abs diff {diff:.3e} > atol {atol:.3e}"


def adapter_for(base_dir, output, ids, seed=0):
    """A default-target adapter of the torch backend with a random, non-zero lora_B; returns
    (adapter directory, the backend's logits of `ids` with it)."""
    backend = get_backend("torch")
    model = backend.load_model(str(base_dir))
    backend.attach_lora(model, LoraConfig(rank=4, alpha=8.0), seed=seed)
    backend.set_parameters(model, parity_lora_init(backend.parameters(model, True), seed))
    backend.save_adapter(model, str(output))
    return str(output), backend.token_logits(model, ids, np.ones_like(ids))


def quiet(message):  # warnings are checked where they are the point
    print(f"warning: {message}")


# --------------------------------------------------------------------------- mlx

# What of each tiny checkpoint mlx-lm does not implement, switched off here (mlx-lm would
# compute other logits, and the export warns: see test_mlx_lm_limits), and the longest
# sequence compared: no longer than the sliding windows mlx-lm lacks (Mistral, Qwen-2, Phi-3
# and Gemma-2's; 8 tokens, Phi-3's 12). Phi-3's long rope factors, which mlx-lm always uses,
# take over in transformers past original_max_position_embeddings, 8 here.
MLX_LM = {
    "llama": ({}, 16),
    "mistral": ({}, 8),
    "qwen2": ({}, 8),
    "qwen3": ({"attention_bias": False}, 16),
    "gemma3_text": ({"final_logit_softcapping": None}, 16),
    "phi3": ({"original_max_position_embeddings": 8}, 12),
    "gemma2": ({}, 8),
    "gpt2": ({}, 16),
}


@pytest.mark.parametrize("arch", MLX_LM)
def test_mlx_export_with_adapter_matches_the_merged_model(arch, tiny_dir, tiny_builder, tmp_path):
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    overrides, length = MLX_LM[arch]
    base = str(tiny_dir / f"tiny-{arch}")
    if overrides:
        base = tiny_builder.build(arch, str(tmp_path / "base"), **overrides)
    ids = RNG.integers(4, 320, size=(2, length))
    adapter, reference = adapter_for(base, tmp_path / "adapter", ids)
    warnings = []
    output = exporting.export_model(
        base, str(tmp_path / "out"), "mlx", adapter, warn=warnings.append
    )
    model, tokenizer = mlx_lm.load(output)
    logits = np.array(model(mx.array(ids)).astype(mx.float32))
    report(f"{arch} mlx export (mlx-lm) vs torch backend + adapter", logits, reference)

    config = json.loads(Path(output, "config.json").read_text())
    assert config["model_type"] == arch and "quantization" not in config
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert Path(output, name).read_bytes() == Path(base, name).read_bytes(), name
    assert tokenizer.chat_template == Path(base, "chat_template.jinja").read_text()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    print(f"{arch} warnings: {warnings}")


def test_mlx_export_quantized(tiny_dir, tmp_path):
    """--quantize 4: config.json states it, mlx-lm loads quantized layers, every weight is
    within one quantization step (|scale|) of the merged one (MLX fits the zero point of each
    group too, so not within half a step), and the logits stay close. The bound on
    logits is loose on purpose: 4 bits in groups of 64 (one group per row of the tiny GPT-2)
    moves them by 14% (relative Frobenius norm); 0.3 is allowed."""
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    nn = pytest.importorskip("mlx.nn")
    from mlx.utils import tree_flatten

    base = str(tiny_dir / "tiny-gpt2")
    ids = RNG.integers(4, 320, size=(2, 16))
    adapter, _ = adapter_for(base, tmp_path / "adapter", ids)
    plain = exporting.export_model(base, str(tmp_path / "plain"), "mlx", adapter, warn=quiet)
    output = exporting.export_model(
        base, str(tmp_path / "q4"), "mlx", adapter, quantize=4, warn=quiet
    )
    config = json.loads(Path(output, "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}

    quantized, _ = mlx_lm.load(output)
    full, _ = mlx_lm.load(plain)
    weights = dict(tree_flatten(full.parameters()))
    layers = [(p, m) for p, m in quantized.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert len(layers) == 8  # c_attn, c_proj, c_fc, mlp c_proj of both blocks
    for path, module in layers:
        assert (module.bits, module.group_size) == (4, 64), path
        dequantized = mx.dequantize(
            module.weight, module.scales, module.biases, module.group_size, module.bits
        )
        step = np.repeat(np.abs(np.array(module.scales)), 64, axis=-1)
        error = np.abs(np.array(dequantized) - np.array(weights[f"{path}.weight"]))
        assert np.all(error <= step + 1e-6), path

    a = np.array(full(mx.array(ids)))
    b = np.array(quantized(mx.array(ids)))
    relative = np.linalg.norm(a - b) / np.linalg.norm(a)
    print(f"gpt2 4-bit vs unquantized logits: relative error {relative:.3f}")
    assert 0 < relative < 0.3


def test_mlx_export_dtype(tiny_dir, tmp_path):
    pytest.importorskip("mlx_lm")
    from safetensors import safe_open

    output = exporting.export_model(
        str(tiny_dir / "tiny-llama"), str(tmp_path / "out"), "mlx", dtype="bfloat16", warn=quiet
    )
    with safe_open(os.path.join(output, "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_mlx_lm_limits(tiny_dir, tiny_builder, tmp_path):
    """A warning names each thing mlx-lm computes otherwise; a qwen3 with attention biases,
    which mlx-lm cannot load, is refused."""

    def limits(arch, **overrides):
        path = str(tiny_dir / f"tiny-{arch}")
        if overrides:
            path = tiny_builder.build(arch, str(tmp_path / arch), **overrides)
        config = json.loads(Path(path, "config.json").read_text())
        return exporting.mlx_lm_limits(path, config)

    assert limits("llama") == []
    assert limits("gpt2") == []
    [mistral] = limits("mistral")
    assert "ignores the sliding window of 8 tokens on layers 0, 1" in mistral
    [qwen2] = limits("qwen2")
    assert "sliding window of 8 tokens on layers 1, 2" in qwen2
    assert "layers 0, 2" in limits("gemma2")[0]
    [gemma3] = limits("gemma3_text")  # mlx-lm has Gemma-3's windows, not its final soft-cap
    assert "final_logit_softcapping 30.0" in gemma3
    window, rope = limits("phi3")
    assert "sliding window of 12" in window and "long factors" in rope
    assert limits("mistral", sliding_window=None) == []
    with pytest.raises(UserError, match="mlx-lm cannot load this qwen3 .*attention_bias"):
        limits("qwen3")


# --------------------------------------------------------------------------- gguf


def gguf_tensors(path):
    """name -> (float32 array in the checkpoint's row-major shape, GGML type name)."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(path)
    tensors = {}
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        tensors[tensor.name] = (
            np.asarray(data, np.float32).reshape(shape),
            tensor.tensor_type.name,
        )
    return reader, tensors


def field(reader, key):
    return reader.fields[key].contents()


# transformers' names of the Llama family, llama.cpp's for each (block i).
LLAMA_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(key):
    if key in LLAMA_NAMES:
        return LLAMA_NAMES[key]
    _, _, i, rest = key.split(".", 3)
    module, _, kind = rest.rpartition(".")
    return f"blk.{i}.{LAYER_NAMES[module]}.{kind}"


@pytest.fixture(scope="module")
def llama_gguf(tiny_dir, tmp_path_factory):
    """The tiny Llama (GQA, llama3 rope, attention and MLP biases, untied head) with an
    adapter, merged, and exported to GGUF in every output type."""
    pytest.importorskip("gguf")
    root = tmp_path_factory.mktemp("gguf")
    base = str(tiny_dir / "tiny-llama")
    adapter, _ = adapter_for(base, root / "adapter", RNG.integers(4, 320, size=(1, 4)))
    merged = merge_adapter(base, adapter, str(root / "merged"))
    outputs = {
        outtype: exporting.export_model(
            base, str(root / outtype), "gguf", adapter, outtype=outtype, warn=quiet
        )
        for outtype in exporting.GGUF_OUTTYPES
    }
    return {"base": base, "merged": merged, "outputs": outputs}


# How each output type stores a matrix, and the largest error reading it back may show:
# f32 exact, f16 and bf16 round to nearest (half a step: 2^-11, 2^-8 relative), q8_0 half a
# step of its per-32 scale d = max|block| / 127, plus the rounding of d to float16 (127 steps
# of at most d * 2^-11).
OUTTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}


@pytest.mark.parametrize("outtype", exporting.GGUF_OUTTYPES)
def test_gguf_llama_tensors_read_back(outtype, llama_gguf):
    reader, tensors = gguf_tensors(
        os.path.join(llama_gguf["outputs"][outtype], exporting.GGUF_FILE)
    )
    merged = {
        k: v.numpy() for k, v in load_file(f"{llama_gguf['merged']}/model.safetensors").items()
    }
    config = json.loads(Path(llama_gguf["base"], "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    assert set(tensors) == {gguf_name(k) for k in merged} | {"rope_freqs.weight"}
    for key, expected in merged.items():
        value, kind = tensors[gguf_name(key)]
        if ".q_proj." in key:
            value = exporting.llama_cpp_unpermute(value, heads)
        elif ".k_proj." in key:
            value = exporting.llama_cpp_unpermute(value, kv_heads)
        assert value.shape == expected.shape, key
        if expected.ndim == 1:
            assert kind == "F32" and np.array_equal(value, expected), key
            continue
        assert kind == OUTTYPES[outtype], key
        if outtype == "f32":
            assert np.array_equal(value, expected), key
        elif outtype == "f16":
            assert np.array_equal(value, expected.astype(np.float16).astype(np.float32)), key
        elif outtype == "bf16":
            np.testing.assert_allclose(value, expected, rtol=2**-8, atol=0, err_msg=key)
        else:
            blocks = np.abs(expected).reshape(-1, 32).max(axis=1, keepdims=True) / 127
            error = np.abs(value - expected).reshape(-1, 32)
            assert np.all(error <= blocks * (0.5 + 127 * 2**-11)), key
    assert (
        field(reader, "general.file_type") == {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[outtype]
    )


def test_gguf_llama_metadata(llama_gguf):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    reader, tensors = gguf_tensors(os.path.join(llama_gguf["outputs"]["f32"], "model.gguf"))
    config = json.loads(Path(llama_gguf["base"], "config.json").read_text())
    rope = config["rope_parameters"]
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.block_count") == config["num_hidden_layers"]
    assert field(reader, "llama.context_length") == config["max_position_embeddings"]
    assert field(reader, "llama.embedding_length") == config["hidden_size"]
    assert field(reader, "llama.feed_forward_length") == config["intermediate_size"]
    assert field(reader, "llama.attention.head_count") == config["num_attention_heads"]
    assert field(reader, "llama.attention.head_count_kv") == config["num_key_value_heads"]
    assert field(reader, "llama.attention.key_length") == config["head_dim"]
    assert field(reader, "llama.rope.dimension_count") == config["head_dim"]
    assert field(reader, "llama.rope.freq_base") == rope["rope_theta"]
    assert math.isclose(
        field(reader, "llama.attention.layer_norm_rms_epsilon"),
        config["rms_norm_eps"],
        rel_tol=1e-6,
    )
    assert "llama.rope.scaling.type" not in reader.fields  # llama3 scaling is rope_freqs
    # llama.cpp divides each default inverse frequency by its rope_freqs factor: that must be
    # transformers' llama3 inverse frequency.
    hf_config = transformers.AutoConfig.from_pretrained(llama_gguf["base"])
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    dim = config["head_dim"]
    default = 1.0 / rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    factors, _ = tensors["rope_freqs.weight"]
    np.testing.assert_allclose(default / factors, inv_freq.numpy(), rtol=1e-6)
    assert not np.all(factors == 1) and not np.all(factors == rope["factor"])

    tokenizer_json = json.loads(Path(llama_gguf["base"], "tokenizer.json").read_text())
    from mlxpost.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(llama_gguf["base"]).tokenizer
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert len(tokens) == config["vocab_size"]
    assert tokens == [tokenizer.convert_ids_to_tokens(i) for i in range(config["vocab_size"])]
    types = field(reader, "tokenizer.ggml.token_type")
    assert {i for i, t in enumerate(types) if t == 3} == set(tokenizer.all_special_ids)
    assert len(field(reader, "tokenizer.ggml.merges")) == len(tokenizer_json["model"]["merges"])
    assert field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id == 2
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field(reader, "tokenizer.ggml.padding_token_id") == tokenizer.pad_token_id
    assert field(reader, "tokenizer.chat_template") == tokenizer.chat_template


def test_llama_cpp_permutation_is_its_rotary_layout():
    """Rotating the permuted rows with adjacent pairs (llama.cpp's layout) gives the attention
    scores that rotating the original rows with half-split pairs (transformers') gives."""
    heads, head_dim, width, positions = 2, 8, 12, 5
    q = RNG.normal(size=(heads * head_dim, width))
    k = RNG.normal(size=(heads * head_dim, width))
    x = RNG.normal(size=(positions, width))
    angles = np.outer(np.arange(positions), 1.0 / 100 ** (np.arange(0, head_dim, 2) / head_dim))
    cos, sin = np.cos(angles), np.sin(angles)

    def half_split(v):  # (positions, heads, head_dim)
        a, b = v[..., : head_dim // 2], v[..., head_dim // 2 :]
        c, s = cos[:, None], sin[:, None]
        return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)

    def adjacent(v):
        a, b = v[..., 0::2], v[..., 1::2]
        c, s = cos[:, None], sin[:, None]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = a * c - b * s, b * c + a * s
        return out

    def scores(wq, wk, rotate):
        qs = rotate((x @ wq.T).reshape(positions, heads, head_dim))
        ks = rotate((x @ wk.T).reshape(positions, heads, head_dim))
        return np.einsum("phd,qhd->hpq", qs, ks)

    expected = scores(q, k, half_split)
    permuted = [exporting.llama_cpp_permute(w, heads) for w in (q, k)]
    np.testing.assert_allclose(scores(*permuted, adjacent), expected, rtol=1e-10, atol=1e-10)
    assert not np.allclose(scores(q, k, adjacent), expected)
    for w in (q, q[:, 0]):
        assert np.array_equal(
            exporting.llama_cpp_unpermute(exporting.llama_cpp_permute(w, 2), 2), w
        )


@pytest.fixture(scope="module")
def qwen_ggufs(tiny_dir, tiny_builder, tmp_path_factory):
    """f32 GGUF exports of the tiny Qwen2 (q/k/v biases, windows, tied head; its tokenizer
    class splits digits one by one) and of a tiny Qwen3 without attention biases (q/k norms,
    head_dim 32 with hidden 64, linear rope scaling), and their checkpoints."""
    pytest.importorskip("gguf")
    root = tmp_path_factory.mktemp("qwen-gguf")
    bases = {
        "qwen2": str(tiny_dir / "tiny-qwen2"),
        "qwen3": tiny_builder.build("qwen3", str(root / "qwen3"), attention_bias=False),
    }
    return {
        arch: (
            base,
            exporting.export_model(
                base, str(root / f"{arch}-gguf"), "gguf", outtype="f32", warn=quiet
            ),
        )
        for arch, base in bases.items()
    }


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_gguf_qwen_reads_back(arch, qwen_ggufs):
    """llama.cpp's Qwen models rotate as transformers does: no row reordering."""
    base, output = qwen_ggufs[arch]
    reader, tensors = gguf_tensors(os.path.join(output, exporting.GGUF_FILE))
    checkpoint = {k: v.numpy() for k, v in load_file(f"{base}/model.safetensors").items()}
    assert "lm_head.weight" not in checkpoint  # tied: llama.cpp reads token_embd
    assert set(tensors) == {gguf_name(k) for k in checkpoint}
    for key, expected in checkpoint.items():
        assert np.array_equal(tensors[gguf_name(key)][0], expected), key
    config = json.loads(Path(base, "config.json").read_text())
    assert field(reader, "general.architecture") == arch
    assert field(reader, f"{arch}.attention.key_length") == config.get("head_dim", 16)
    assert field(reader, f"{arch}.attention.head_count_kv") == config["num_key_value_heads"]
    pre = {"qwen2": "qwen2", "qwen3": "gpt-2"}[arch]  # as transformers loads each
    assert field(reader, "tokenizer.ggml.pre") == pre
    if arch == "qwen3":
        assert field(reader, "qwen3.rope.scaling.type") == "linear"
        assert field(reader, "qwen3.rope.scaling.factor") == 2.0


def test_gguf_in_llama_cpp(llama_gguf, qwen_ggufs, tiny_dir, tmp_path):
    """Where llama-cpp-python is installed: llama.cpp computes transformers' logits from the
    exports (float32 weights and KV cache; within the sliding windows it lacks) and tokenizes
    text as transformers does, BOS included."""
    llama_cpp = pytest.importorskip("llama_cpp")
    transformers = pytest.importorskip("transformers")
    from mlxpost.tokenizer import load_tokenizer

    mistral = exporting.export_model(
        str(tiny_dir / "tiny-mistral"),
        str(tmp_path / "mistral"),
        "gguf",
        outtype="f32",
        warn=quiet,
    )
    cases = {  # checkpoint, export, longest sequence compared
        "llama": (llama_gguf["merged"], llama_gguf["outputs"]["f32"], 16),
        "mistral": (str(tiny_dir / "tiny-mistral"), mistral, 8),
        "qwen2": (*qwen_ggufs["qwen2"], 8),
        "qwen3": (*qwen_ggufs["qwen3"], 16),
    }
    text = "Hello world's 12345 numbers\n\n  spaces\tand \u00fcn\u00efc\u00f6d\u00e9 3.14 DON'T"
    for arch, (checkpoint, output, length) in cases.items():
        ids = RNG.integers(4, 320, size=length).tolist()
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].numpy()
        llm = llama_cpp.Llama(
            os.path.join(output, exporting.GGUF_FILE),
            n_ctx=64,
            logits_all=True,
            n_threads=1,
            type_k=0,
            type_v=0,
            verbose=False,
        )
        llm.eval(ids)
        report(f"{arch} gguf in llama.cpp vs transformers", np.array(llm.scores[:length]), expected)
        tokenizer = load_tokenizer(checkpoint).tokenizer
        assert (
            llm.tokenize(text.encode(), add_bos=False, special=True)
            == tokenizer(text, add_special_tokens=False)["input_ids"]
        ), arch
        assert llm.tokenize(b"hi", add_bos=True) == tokenizer("hi")["input_ids"], arch
        llm.close()


def test_gguf_refuses_what_it_cannot_map(tiny_dir, tmp_path):
    pytest.importorskip("gguf")
    for arch in ("gpt2", "gemma2", "gemma3_text", "phi3"):
        with pytest.raises(
            UserError, match=f"supports model_type llama, mistral, qwen2, qwen3, not {arch}"
        ):
            exporting.export_model(str(tiny_dir / f"tiny-{arch}"), str(tmp_path / "o"), "gguf")
    with pytest.raises(UserError, match="llama.cpp's qwen3 model has no attention biases"):
        exporting.export_model(str(tiny_dir / "tiny-qwen3"), str(tmp_path / "o"), "gguf")
    qwen2 = json.loads((tiny_dir / "tiny-qwen2" / "config.json").read_text())
    qwen2["rope_parameters"] = {
        **json.loads((tiny_dir / "tiny-llama" / "config.json").read_text())["rope_parameters"]
    }
    with pytest.raises(UserError, match="rope type 'llama3' is not exported to GGUF for qwen2"):
        exporting.gguf_limits(str(tiny_dir / "tiny-qwen2"), qwen2)
    window = exporting.gguf_limits(
        str(tiny_dir / "tiny-mistral"),
        json.loads((tiny_dir / "tiny-mistral" / "config.json").read_text()),
    )
    assert window == [
        "llama.cpp's llama model ignores the sliding window of 8 tokens: beyond 8 tokens its "
        "logits differ from transformers'"
    ]
    assert not os.listdir(tmp_path)


# --------------------------------------------------------------------------- command line


def run_cli(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def assert_user_error(result, *fragments):
    code, _, stderr = result
    assert code == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("export: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_export_gguf(tiny_dir, tmp_path):
    pytest.importorskip("gguf")
    output = str(tmp_path / "out")
    code, stdout, stderr = run_cli(
        "export", "--model", str(tiny_dir / "tiny-mistral"), "--format", "gguf", "--output", output
    )
    assert code == 0, stderr
    assert stdout.strip() == output
    assert "warning: llama.cpp's llama model ignores the sliding window" in stderr
    _, tensors = gguf_tensors(os.path.join(output, "model.gguf"))
    assert tensors["blk.0.attn_q.weight"][1] == "F16"


def test_cli_bad_inputs(tiny_dir, tmp_path):
    gpt2, llama = str(tiny_dir / "tiny-gpt2"), str(tiny_dir / "tiny-llama")
    out = str(tmp_path / "out")
    assert_user_error(
        run_cli("export", "--model", gpt2, "--format", "gguf", "--output", out),
        "--format gguf supports model_type llama, mistral, qwen2, qwen3, not gpt2",
    )
    assert_user_error(
        run_cli(
            "export", "--model", str(tiny_dir / "tiny-qwen3"), "--format", "mlx", "--output", out
        ),
        "mlx-lm cannot load this qwen3",
    )
    assert_user_error(
        run_cli(
            "export", "--model", llama, "--format", "mlx", "--outtype", "q8_0", "--output", out
        ),
        "--outtype applies to --format gguf",
    )
    assert_user_error(
        run_cli(
            "export",
            "--model",
            llama,
            "--format",
            "mlx",
            "--adapter",
            str(tmp_path / "nope"),
            "--output",
            out,
        ),
        "adapter_config.json: not found",
    )
    assert not os.path.exists(out)
    Path(out).mkdir()
    Path(out, "keep.txt").write_text("x")
    assert_user_error(
        run_cli("export", "--model", llama, "--format", "gguf", "--output", out),
        "not empty; pass --force",
    )
    assert os.listdir(out) == ["keep.txt"]
    code, _, stderr = run_cli(
        "export", "--model", llama, "--format", "gguf", "--output", out, "--force"
    )
    assert code == 0, stderr
    assert os.listdir(out) == ["model.gguf"]
