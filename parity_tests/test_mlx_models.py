"""Parity of the MLX models of every architecture against transformers (float32, eager attention).

Random tiny models are built with transformers, saved with save_pretrained and loaded through
``mlxpost.mlx_backend.models.common.load_model``.  Float32 comparisons use
atol = 1e-5 * max(1, max|reference logit|): float32 rounding noise of a few ops per layer, not a
bug budget.  Every comparison prints its max / mean abs difference (run with ``-s`` to see them).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mlxpost.mlx_backend.models import ARCHITECTURES, build_model
from mlxpost.mlx_backend.models.common import KVCache, load_model, load_weights

VOCAB = 97
F32_RTOL = 1e-5
# bfloat16 keeps 8 significant bits (eps 2**-8 = 3.9e-3).  Measured max |ours bf16 - f32| is
# ~0.8% of the largest logit for GPT-2 and 2.7-4.4% for the deliberately large-weight Gemma-2
# (seeds 0-2; transformers' own bf16 run is 3.1-3.7% off on the same models): rounding of weights,
# activations and residual sums compounds over layers and through near-saturated softmaxes.
# 6% of the logit scale still catches real bugs (a wrong mask/position/scale is O(100%)).
BF16_RTOL = 0.06


@pytest.fixture(scope="module", autouse=True)
def _deterministic_torch():
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.use_deterministic_algorithms(False)


def report(what, actual, expected, rtol=F32_RTOL):
    """Assert |actual - expected| <= rtol * max(1, max|expected|); print the measured diffs."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} vs {e.shape}"
    assert np.isfinite(a).all(), f"{what}: non-finite values"
    diff = np.abs(a - e)
    atol = rtol * max(1.0, float(np.abs(e).max()))
    msg = f"{what}: max abs diff {diff.max():.3e}, mean abs diff {diff.mean():.3e}, atol {atol:.3e}"
    print(msg)
    assert diff.max() <= atol, msg


def to_np(x):
    return np.array(x.astype(mx.float32)) if isinstance(x, mx.array) else x.detach().float().numpy()


# --------------------------------------------------------------------------- fixtures


def make_gpt2(path, seed=0, **overrides):
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        attn_implementation="eager",
    )
    kw.update(overrides)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw)).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine params and biases
        for name, p in hf.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    hf.save_pretrained(path)
    return hf


def make_gemma2(path, seed=0, **overrides):
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        sliding_window=8,
        query_pre_attn_scalar=8,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        initializer_range=0.6,  # big weights so both soft-caps bite (see test_gemma2_softcaps_bite)
        attn_implementation="eager",
    )
    kw.update(overrides)
    hf = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**kw)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(1.0 if name == "model.norm.weight" else 0.0, 0.5)
    hf.save_pretrained(path)
    return hf


# The Llama-like families come from scripts/build_tiny_models.py, which switches on their
# non-default options (GQA, rope scaling, biases, q/k norms, windows of 8-12 tokens).
LLAMA_LIKE = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"]


@pytest.fixture(scope="module", params=["gpt2", "gemma2", *LLAMA_LIKE])
def pair(request, tmp_path_factory, tiny_builder):
    """(arch, transformers model, MLX model) built from the same random checkpoint."""
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "gpt2":
        hf = make_gpt2(path)
    elif request.param == "gemma2":
        hf = make_gemma2(path)
    else:
        tiny_builder.build(request.param, str(path))
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        ).eval()
    return request.param, hf, load_model(str(path)), path


def hf_logits(hf, ids, mask=None, positions=None):
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=None if mask is None else torch.tensor(mask, dtype=torch.long),
            position_ids=None if positions is None else torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.float().numpy()


def mlx_logits(model, ids, mask, positions, cache=None):
    hidden = model(
        mx.array(ids, dtype=mx.int32),
        mx.array(positions, dtype=mx.int32),
        mx.array(mask, dtype=mx.int32),
        cache,
    )
    logits = model.lm_logits(hidden)
    mx.eval(logits)
    return to_np(logits)


def left_padded(rng, lengths, total):
    """ids, mask, positions (= cumsum(mask) - 1, clamped at 0 on padding) for left padding."""
    ids = rng.integers(1, VOCAB, size=(len(lengths), total))
    mask = np.zeros((len(lengths), total), dtype=np.int64)
    for b, n in enumerate(lengths):
        mask[b, total - n :] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


# --------------------------------------------------------------------------- (a)-(c) forward


def test_no_padding(pair):
    arch, hf, model, _ = pair
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, size=(2, 44))  # longer than Gemma's sliding window of 8
    pos = np.broadcast_to(np.arange(44), ids.shape)
    report(
        f"{arch} (a) no padding", mlx_logits(model, ids, np.ones_like(ids), pos), hf_logits(hf, ids)
    )


def test_right_padding(pair):
    arch, hf, model, _ = pair
    rng = np.random.default_rng(2)
    T, lengths = 40, [40, 27, 11]
    ids = rng.integers(0, VOCAB, size=(3, T))
    mask = (np.arange(T)[None] < np.array(lengths)[:, None]).astype(np.int64)
    pos = np.broadcast_to(np.arange(T), ids.shape)
    ours = mlx_logits(model, ids, mask, pos)
    ref = hf_logits(hf, ids, mask, pos)
    real = mask.astype(bool)
    report(f"{arch} (b) right padding", ours[real], ref[real])


def test_left_padding(pair):
    arch, hf, model, _ = pair
    rng = np.random.default_rng(3)
    ids, mask, pos = left_padded(rng, [42, 30, 9, 0], 42)  # last row is all padding
    ours = mlx_logits(model, ids, mask, pos)
    ref = hf_logits(hf, ids, mask, pos)
    assert np.isfinite(ours).all(), "padding rows produced NaN/inf"
    real = mask.astype(bool)
    report(f"{arch} (c) left padding", ours[real], ref[real])


# --------------------------------------------------------------------------- (d), (e) cache


def test_incremental_decode(pair):
    arch, hf, model, _ = pair
    rng = np.random.default_rng(4)
    prompt, chunk, steps = 7, 5, 30
    total = prompt + chunk + steps  # 42 > sliding window
    ids, mask, pos = left_padded(rng, [total, total - 3], total)
    full = mlx_logits(model, ids, mask, pos)
    ref = hf_logits(hf, ids, mask, pos)
    cache = KVCache(model.num_layers, 2, model.num_kv_heads, total, model.head_dim, mx.float32)

    # prefill, then a multi-token chunk (offset > 0, T > 1), then one token at a time
    bounds = [(0, prompt), (prompt, prompt + chunk)] + [
        (t, t + 1) for t in range(prompt + chunk, total)
    ]
    pieces = []
    for s, e in bounds:
        pieces.append(mlx_logits(model, ids[:, s:e], mask[:, :e], pos[:, s:e], cache))
        assert cache.offset == e
    step = np.concatenate(pieces, axis=1)
    real = mask.astype(bool)
    report(f"{arch} (d) cached decode vs MLX full forward", step[real], full[real])
    report(f"{arch} (d) cached decode vs transformers", step[real], ref[real])


def test_cache_repeat(pair):
    arch, hf, model, _ = pair
    rng = np.random.default_rng(5)
    n, P = 3, 12
    ids, mask, pos = left_padded(rng, [P, 8], P)
    cache = KVCache(model.num_layers, 2, model.num_kv_heads, P + 2, model.head_dim, mx.float32)
    mlx_logits(model, ids, mask, pos, cache)
    rep = cache.repeat(n)
    assert rep.offset == cache.offset == P and rep.batch == 2 * n

    # same next token for every copy: identical logits, equal to the un-repeated cache
    nxt = rng.integers(0, VOCAB, size=(2, 1))
    mask1 = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    pos1 = pos[:, -1:] + 1
    base = mlx_logits(model, nxt, mask1, pos1, cache)[:, 0]
    copies = mlx_logits(
        model, np.repeat(nxt, n, 0), np.repeat(mask1, n, 0), np.repeat(pos1, n, 0), rep
    )[:, 0]
    report(f"{arch} (e) repeat copies vs un-repeated", copies, np.repeat(base, n, 0))

    # then a different token per copy: copy c of row b must continue row b's prompt
    nxt2 = rng.integers(0, VOCAB, size=(2 * n, 1))
    mask2 = np.concatenate([np.repeat(mask1, n, 0), np.ones((2 * n, 1), np.int64)], axis=1)
    pos2 = np.repeat(pos1, n, 0) + 1
    ours = mlx_logits(model, nxt2, mask2, pos2, rep)[:, 0]
    full_ids = np.concatenate([np.repeat(np.concatenate([ids, nxt], 1), n, 0), nxt2], axis=1)
    full_pos = np.concatenate([np.repeat(np.concatenate([pos, pos1], 1), n, 0), pos2], axis=1)
    ref = hf_logits(hf, full_ids, mask2, full_pos)[:, -1]
    report(f"{arch} (e) repeat then diverge vs transformers", ours, ref)


# --------------------------------------------------------------------------- (f) loading


def _gpt2_reference(tmp_path):
    hf = make_gpt2(tmp_path / "hf")
    rng = np.random.default_rng(6)
    ids = rng.integers(0, VOCAB, size=(1, 20))
    return hf, ids, hf_logits(hf, ids)


def _check_gpt2_dir(path, ids, ref, what):
    model = load_model(str(path))
    pos = np.arange(ids.shape[1])[None]
    report(what, mlx_logits(model, ids, np.ones_like(ids), pos), ref)


def test_gpt2_transformers_layout_without_n_ctx(tmp_path):
    hf, ids, ref = _gpt2_reference(tmp_path)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "n_ctx" not in cfg
    assert all(k.startswith("transformer.") for k in load_weights(str(tmp_path / "hf")))
    _check_gpt2_dir(tmp_path / "hf", ids, ref, "gpt2 (f) transformers layout, no n_ctx")


@pytest.mark.parametrize("config_style", ["n_ctx_only", "n_ctx_and_n_positions"])
def test_gpt2_original_layout(tmp_path, config_style):
    from safetensors.numpy import save_file

    hf, ids, ref = _gpt2_reference(tmp_path)
    n = hf.config.n_positions
    # OpenAI-style checkpoint: no "transformer." prefix, causal-mask buffers, untied-looking lm_head
    tensors = {k.removeprefix("transformer."): v.numpy() for k, v in hf.state_dict().items()}
    for i in range(hf.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((n, n), np.float32))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = hf.lm_head.weight.detach().numpy()
    out = tmp_path / "orig"
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["n_ctx"] = n
    if config_style == "n_ctx_only":
        del cfg["n_positions"]
    (out / "config.json").write_text(json.dumps(cfg))
    _check_gpt2_dir(out, ids, ref, f"gpt2 (f) original layout, {config_style}")


def test_parameter_names_match_transformers(pair):
    from mlx.utils import tree_flatten

    arch, hf, model, _ = pair
    ours = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    tied = hf.config.tie_word_embeddings
    theirs = {
        k: tuple(v.shape)
        for k, v in hf.state_dict().items()
        if k != "lm_head.weight" or not tied  # a tied head reads the embedding
    }
    assert ours == theirs
    assert isinstance(model.config, dict) and model.config["model_type"] == arch


def test_strict_loading_and_unknown_arch(tmp_path):
    from safetensors.numpy import save_file

    hf = make_gpt2(tmp_path)
    tensors = {k: v.numpy() for k, v in hf.state_dict().items()}
    tensors.pop("transformer.h.1.mlp.c_fc.bias")
    tensors["transformer.h.0.attn.extra"] = np.zeros(3, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.bias.*h\.0\.attn\.extra"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="unsupported model_type 'mamba'.*supported"):
        build_model({"model_type": "mamba"})
    assert set(ARCHITECTURES) == {"gpt2", "gemma2", *LLAMA_LIKE}


def test_gemma2_old_config_and_custom_layer_types(tmp_path):
    # Old-style config (no layer_types: default even layers slide; rope_theta at top level)
    hf = make_gemma2(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    del cfg["layer_types"]
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(7)
    ids, mask, pos = left_padded(rng, [30, 21], 30)
    real = mask.astype(bool)
    ours = mlx_logits(load_model(str(tmp_path / "a")), ids, mask, pos)
    report("gemma2 (f) old-style config", ours[real], hf_logits(hf, ids, mask, pos)[real])

    # An explicit non-default pattern must be obeyed
    types = ["full_attention", "sliding_attention", "sliding_attention"]
    hf = make_gemma2(tmp_path / "b", layer_types=types)
    model = load_model(str(tmp_path / "b"))
    assert [layer.sliding for layer in model.model.layers] == [False, True, True]
    ours = mlx_logits(model, ids, mask, pos)
    report("gemma2 (f) custom layer_types", ours[real], hf_logits(hf, ids, mask, pos)[real])


def test_gemma2_softcaps_bite(tmp_path):
    """The soft-caps must change the output, or the parity tests would not exercise them."""
    hf = make_gemma2(tmp_path)
    ids = np.random.default_rng(8).integers(0, VOCAB, size=(2, 40))
    with torch.no_grad():
        hidden = hf.model(input_ids=torch.tensor(ids)).last_hidden_state
        raw = hf.lm_head(hidden)
    assert raw.abs().max().item() > 30.0  # final cap 30: tanh(>1) is far from linear
    capped = hf_logits(hf, ids)
    hf.config.attn_logit_softcapping = None
    for layer in hf.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    uncapped = hf_logits(hf, ids)
    assert np.abs(capped - uncapped).max() > 0.5  # the attention cap bites too


# --------------------------------------------------------------------------- (g) half precision


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_half_precision(pair, dtype_name):
    """Half precision runs, stays in that dtype, and is as close to float32 as transformers is.

    Reference is transformers in float32.  Two bounds: BF16_RTOL of the logit scale (absolute
    sanity), and no worse than 2x transformers' own error when run in the same dtype.
    """
    arch, hf, _, path = pair
    dtype = getattr(mx, dtype_name)
    model = load_model(str(path), dtype=dtype)
    assert model.dtype == dtype
    rng = np.random.default_rng(9)
    ids, mask, pos = left_padded(rng, [36, 20], 36)
    hidden = model(mx.array(ids, mx.int32), mx.array(pos, mx.int32), mx.array(mask, mx.int32))
    logits = model.lm_logits(hidden)
    assert hidden.dtype == dtype and logits.dtype == dtype
    real = mask.astype(bool)
    ours = to_np(logits)[real]
    ref32 = hf_logits(hf, ids, mask, pos)[real]
    report(f"{arch} (g) {dtype_name} vs transformers float32", ours, ref32, rtol=BF16_RTOL)
    # a copy: casting the shared float32 model down and back would round its weights
    theirs = hf_logits(copy.deepcopy(hf).to(getattr(torch, dtype_name)), ids, mask, pos)[real]
    our_err, their_err = np.abs(ours - ref32).max(), np.abs(theirs - ref32).max()
    print(f"{arch} (g) transformers {dtype_name} vs its float32: max abs diff {their_err:.3e}")
    assert our_err <= 2 * their_err + 1e-3 * np.abs(ref32).max(), (our_err, their_err)


def test_float32_error_is_rounding(pair):
    """Referee: against a float64 run of transformers, our float32 error is comparable to
    transformers' own float32 error, so the remaining float32 diff is rounding, not semantics."""
    arch, hf, model, _ = pair
    # No padding here: transformers in float64 turns fully padded query rows into NaN (its
    # float64 mask minimum becomes -inf in the float32 softmax) and 0 * NaN leaks into real rows.
    ids, mask, pos = left_padded(np.random.default_rng(10), [40, 40], 40)
    real = mask.astype(bool)
    ref32 = hf_logits(hf, ids, mask, pos)[real]
    ref64 = hf_logits(copy.deepcopy(hf).to(torch.float64), ids, mask, pos)[real]
    ours = mlx_logits(model, ids, mask, pos)[real]
    our_err, their_err = np.abs(ours - ref64).max(), np.abs(ref32 - ref64).max()
    print(f"{arch} float64 referee: ours {our_err:.3e}, transformers float32 {their_err:.3e}")
    assert our_err <= 3 * their_err + 1e-7 * np.abs(ref64).max(), (our_err, their_err)


# --------------------------------------------------------------------------- the families' options


def _without(monkeypatch, what):
    """Switch one option of the MLX decoder off, to show that the tiny checkpoints exercise it."""
    from mlxpost.mlx_backend.models import decoder

    if what == "sliding windows":
        monkeypatch.setattr(
            decoder, "layer_types", lambda cfg, family: ["full_attention"] * cfg.num_hidden_layers
        )
    elif what == "rope scaling":
        real = decoder.inv_freq_and_scale

        def plain(cfg, params, dim, long=False):
            return real(cfg, {**params, "rope_type": "default"}, dim)

        monkeypatch.setattr(decoder, "inv_freq_and_scale", plain)
    elif what == "q/k norms":
        real_init = decoder.Attention.__init__

        def init(self, *args):
            real_init(self, *args)
            object.__setattr__(self, "_qk_norm", False)

        monkeypatch.setattr(decoder.Attention, "__init__", init)


@pytest.mark.parametrize(
    "arch, what",
    [
        ("mistral", "sliding windows"),
        ("qwen2", "sliding windows"),
        ("gemma3_text", "sliding windows"),
        ("phi3", "sliding windows"),
        ("llama", "rope scaling"),
        ("qwen3", "rope scaling"),
        ("gemma3_text", "rope scaling"),
        ("phi3", "rope scaling"),
        ("qwen3", "q/k norms"),
        ("gemma3_text", "q/k norms"),
    ],
)
def test_family_options_bite(arch, what, tmp_path, tiny_builder, monkeypatch):
    """Each option the tiny checkpoints switch on changes transformers' logits by far more than
    rounding, so the parity tests above would see it missing (here: switched off in ours)."""
    tiny_builder.build(arch, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids, mask, pos = left_padded(np.random.default_rng(11), [30, 22], 30)
    ref = hf_logits(hf, ids, mask, pos)[mask.astype(bool)]
    _without(monkeypatch, what)
    ours = mlx_logits(load_model(str(tmp_path)), ids, mask, pos)[mask.astype(bool)]
    gap = np.abs(ours - ref).max()
    print(f"{arch} without {what}: max abs diff {gap:.3e}")
    assert gap > 100 * F32_RTOL * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic"])
def test_unimplemented_rope_type_is_an_error(rope_type, tmp_path, tiny_builder):
    """A rope variant the MLX code does not implement fails loudly, not with wrong numbers."""
    tiny_builder.build("llama", str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": rope_type, "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match=f"rope_type '{rope_type}' is not supported"):
        build_model(cfg)


def test_phi3_long_rope_factors(tmp_path, tiny_builder):
    """Past original_max_position_embeddings a forward uses longrope's long factors, as
    transformers' does (the tiny checkpoint's original context is longer than the tests')."""
    tiny_builder.build("phi3", str(tmp_path), original_max_position_embeddings=16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    model = load_model(str(tmp_path))
    for total in (12, 30):  # the short factors, then the long ones
        ids, mask, pos = left_padded(np.random.default_rng(12), [total, total - 4], total)
        real = mask.astype(bool)
        report(
            f"phi3 longrope, {total} tokens",
            mlx_logits(model, ids, mask, pos)[real],
            hf_logits(hf, ids, mask, pos)[real],
        )
