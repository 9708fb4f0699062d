"""The two backends against each other (and transformers/peft) on the same checkpoints.

Float32 tolerances: 1e-5 of the largest magnitude compared (a forward pass is a
few thousand float32 operations of relative error ~1e-7 each); see
mlxpost/parity.py. Every failing comparison prints max and mean differences.
"""

from __future__ import annotations

import numpy as np
import pytest

from mlxpost.backend import LoraConfig, OptimConfig, SamplingConfig, adapter_disabled
from mlxpost.functional import nll_loss, prediction_mask
from mlxpost.parity import ParityRun, ParitySetup, default_seq_len, parity_lora_init, token_batch

RTOL = 1e-5


def assert_close(name, reference, other, mask=None, rtol=RTOL):
    reference = np.asarray(reference, np.float64)
    other = np.asarray(other, np.float64)
    assert reference.shape == other.shape, f"{name}: shapes {reference.shape} vs {other.shape}"
    if mask is not None:
        keep = np.asarray(mask).astype(bool)
        reference, other = reference[keep], other[keep]
    diff = np.abs(reference - other)
    tolerance = rtol * max(1.0, float(np.abs(reference).max()))
    assert diff.max() <= tolerance, (
        f"{name}: max abs diff {diff.max():.3g}, mean {diff.mean():.3g}, tolerance {tolerance:.3g}"
    )


def load_pair(backends, checkpoint, lora=True, seed=0):
    """The checkpoint in both backends, with identical LoRA adapters whose B is non-zero."""
    models = [b.load_model(checkpoint) for b in backends]
    if lora:
        for backend, model in zip(backends, models):
            backend.attach_lora(model, LoraConfig(rank=4, alpha=8.0), seed=seed)
            backend.set_parameters(model, parity_lora_init(backend.parameters(model, True), seed))
    return models


def batch_for(model, left: bool, seed=0, batch=3):
    length = default_seq_len(model.config)
    return token_batch(int(model.config["vocab_size"]), batch, length, seed, left)


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_logprobs_match(backends, checkpoint, left):
    models = load_pair(backends, checkpoint, lora=False)
    ids, mask = batch_for(models[0], left)
    ref, other = (b.logprobs(m, ids, mask) for b, m in zip(backends, models))
    assert_close("logprobs", ref, other, prediction_mask(mask))
    hot = (b.logprobs(m, ids, mask, temperature=0.7) for b, m in zip(backends, models))
    assert_close("logprobs at T=0.7", *hot, prediction_mask(mask))


def test_padding_does_not_change_logprobs(backends, checkpoint):
    """A left-padded row gives the unpadded row's logprobs (positions count real tokens)."""
    for backend in backends:
        model = backend.load_model(checkpoint)
        ids, mask = batch_for(model, left=True)
        padded = backend.logprobs(model, ids, mask)
        row = ids[-1][mask[-1] == 1][None]
        alone = backend.logprobs(model, row, np.ones_like(row))
        assert_close(
            f"{backend.name} left-padded vs alone", alone[0, 1:], padded[-1][mask[-1] == 1][1:]
        )


def test_torch_backend_matches_transformers(backends, checkpoint):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager"
    )
    ids, mask = batch_for(backends[0].load_model(checkpoint), left=False, batch=1)
    with torch.no_grad():
        expected = reference(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    for backend in backends:
        model = backend.load_model(checkpoint)
        assert_close(
            f"{backend.name} logits vs transformers",
            expected,
            backend.token_logits(model, ids, mask),
        )


def test_hidden_states_and_scalar_head_match(backends, checkpoint):
    models = load_pair(backends, checkpoint)
    ids, mask = batch_for(models[0], left=True)
    hidden = [b.hidden_states(m, ids, mask) for b, m in zip(backends, models)]
    real = np.broadcast_to(mask[..., None], hidden[0].shape)
    assert_close("hidden states", *hidden, real)
    for backend, model in zip(backends, models):
        backend.attach_scalar_head(model, seed=3)
    scores = [b.scores(m, ids, mask) for b, m in zip(backends, models)]
    assert_close("scalar head", *scores, mask)
    assert np.abs(scores[0][mask == 1]).max() > 0, "scalar head gave all zeros"


def test_adapter_off_is_the_base_model(backends, checkpoint):
    for backend in backends:
        base = backend.load_model(checkpoint)
        model = load_pair([backend], checkpoint)[0]
        ids, mask = batch_for(model, left=False)
        base_logprobs = backend.logprobs(base, ids, mask)
        adapted = backend.logprobs(model, ids, mask)
        with adapter_disabled(backend, model):
            reference = backend.logprobs(model, ids, mask)
        assert_close(
            f"{backend.name} adapter off vs base", base_logprobs, reference, prediction_mask(mask)
        )
        change = np.abs(adapted - base_logprobs)[prediction_mask(mask) == 1].max()
        assert change > 1e-4, (
            f"{backend.name}: the adapter did not change the logprobs ({change:.3g})"
        )


@pytest.mark.parametrize("direction", ["mlx-to-torch", "torch-to-mlx"])
def test_adapter_saved_by_one_backend_loads_in_the_other(backends, checkpoint, tmp_path, direction):
    torch_backend, mlx_backend = backends
    source, target = (
        (mlx_backend, torch_backend)
        if direction == "mlx-to-torch"
        else (torch_backend, mlx_backend)
    )
    model = load_pair([source], checkpoint, seed=5)[0]
    source.save_adapter(model, str(tmp_path))
    loaded = target.load_model(checkpoint)
    target.load_adapter(loaded, str(tmp_path))
    ids, mask = batch_for(model, left=True)
    expected = source.token_logits(model, ids, mask)
    assert_close(
        direction,
        expected,
        target.token_logits(loaded, ids, mask),
        np.broadcast_to(mask[..., None], expected.shape),
    )


def test_adapter_loads_in_peft(backends, checkpoint, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    _, mlx_backend = backends
    model = load_pair([mlx_backend], checkpoint, seed=7)[0]
    mlx_backend.save_adapter(model, str(tmp_path))
    base = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager"
    )
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path))
    ids, mask = batch_for(model, left=False, batch=1)
    with torch.no_grad():
        expected = peft_model(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    assert_close("peft vs mlx adapter", expected, mlx_backend.token_logits(model, ids, mask))


def test_loss_and_gradients_match(backends, checkpoint):
    models = load_pair(backends, checkpoint)
    ids, mask = batch_for(models[0], left=True, seed=1)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "loss_mask": prediction_mask(mask).astype(np.float32),
    }
    (ref_loss, _, ref_grads), (loss, _, grads) = (
        b.loss_and_grads(m, nll_loss, batch) for b, m in zip(backends, models)
    )
    assert_close("loss", ref_loss, loss)
    assert sorted(ref_grads) == sorted(grads)
    assert any(name.endswith("lora_A.weight") for name in grads)
    scale = max(float(np.abs(g).max()) for g in ref_grads.values())
    for name in ref_grads:
        diff = np.abs(ref_grads[name] - grads[name])
        assert diff.max() <= RTOL * scale, (
            f"grad {name}: max {diff.max():.3g}, mean {diff.mean():.3g}"
        )


def training_batches(model, seed):
    """Two microbatches of different sizes: accumulation weights them by token count."""
    first = batch_for(model, left=True, seed=seed, batch=3)
    second = batch_for(model, left=False, seed=seed + 1, batch=2)
    batches = [
        {
            "input_ids": ids,
            "attention_mask": mask,
            "loss_mask": prediction_mask(mask).astype(np.float32),
        }
        for ids, mask in (first, second)
    ]
    weights = [float(b["loss_mask"].sum()) for b in batches]
    return batches, weights


def test_training_steps_match(backends, checkpoint):
    """Warmup + cosine, clipping and accumulation over 4 AdamW steps.

    eps=1e-6 keeps Adam's g / (|g| + eps) from amplifying the last bits of
    gradients that are almost exactly zero, so the weights stay comparable
    at float32 tolerance after several steps.
    """
    models = load_pair(backends, checkpoint)
    cfg = OptimConfig(
        learning_rate=1e-3,
        eps=1e-6,
        warmup_steps=2,
        total_steps=4,
        min_lr_ratio=0.0,
        max_grad_norm=0.05,
        weight_decay=0.01,
    )
    optimizers = [b.make_optimizer(m, cfg) for b, m in zip(backends, models)]
    for step in range(4):
        batches, weights = training_batches(models[0], seed=10 + step)
        results = [
            b.train_step(m, o, nll_loss, batches, weights)
            for b, m, o in zip(backends, models, optimizers)
        ]
        assert results[0]["grad_norm"] > cfg.max_grad_norm, "clipping was not exercised"
        for key in ("loss", "grad_norm", "learning_rate"):
            assert_close(f"step {step} {key}", results[0][key], results[1][key])
    params = [b.parameters(m, trainable_only=True) for b, m in zip(backends, models)]
    for name in params[0]:
        assert_close(f"weights {name}", params[0][name], params[1][name])
    states = [b.optimizer_state(o) for b, o in zip(backends, optimizers)]
    assert sorted(states[0]) == sorted(states[1]) and states[0]["step"] == 4
    for key in states[0]:
        if key != "step":
            assert_close(f"optimizer {key}", states[0][key], states[1][key], rtol=1e-4)


def test_accumulation_equals_one_big_batch(backends, checkpoint):
    """Token-weighted microbatches give the same step as their concatenation."""
    for backend in backends:
        split, whole = load_pair([backend], checkpoint), load_pair([backend], checkpoint)
        model = split[0]
        batches, weights = training_batches(model, seed=3)
        ids = np.concatenate([b["input_ids"] for b in batches])
        mask = np.concatenate([b["attention_mask"] for b in batches])
        combined = {
            "input_ids": ids,
            "attention_mask": mask,
            "loss_mask": prediction_mask(mask).astype(np.float32),
        }
        cfg = OptimConfig(learning_rate=1e-3, eps=1e-6, warmup_steps=0, total_steps=1)
        a = backend.train_step(
            model, backend.make_optimizer(model, cfg), nll_loss, batches, weights
        )
        b = backend.train_step(
            whole[0], backend.make_optimizer(whole[0], cfg), nll_loss, [combined]
        )
        assert_close(f"{backend.name} accumulated loss", b["loss"], a["loss"])
        assert_close(f"{backend.name} accumulated grad norm", b["grad_norm"], a["grad_norm"])


def prompts_for(model, lengths=(5, 9, 3)):
    rng = np.random.default_rng(11)
    return [rng.integers(3, int(model.config["vocab_size"]), size=n).tolist() for n in lengths]


def test_greedy_decoding_matches(backends, checkpoint):
    models = load_pair(backends, checkpoint)
    prompts = prompts_for(models[0])
    for n in (1, 3):
        cfg = SamplingConfig(max_new_tokens=24, temperature=0.0, n=n)
        ref, other = (b.sample(m, prompts, cfg, [-1], 0, 0) for b, m in zip(backends, models))
        np.testing.assert_array_equal(ref.completion_ids, other.completion_ids)
        assert_close(f"greedy logprobs n={n}", ref.logprobs, other.logprobs)
        # n copies of a prompt share its prefill and, greedy, must all agree
        rows = ref.completion_ids.reshape(len(prompts), n, -1)
        assert (rows == rows[:, :1]).all()


def test_behaviour_logprobs_follow_the_trainer_definition(backends, checkpoint):
    """Sampling logprobs equal the trainer's logprobs of the same tokens (T, top-p, top-k on)."""
    cfg = SamplingConfig(max_new_tokens=16, temperature=0.7, top_p=0.9, top_k=20, n=2)
    for backend in backends:
        model = load_pair([backend], checkpoint)[0]
        samples = backend.sample(model, prompts_for(model), cfg, [-1], 0, seed=1)
        ids = np.concatenate([samples.prompt_ids, samples.completion_ids], axis=1)
        mask = np.concatenate([samples.prompt_mask, samples.completion_mask], axis=1)
        trainer = backend.logprobs(model, ids, mask, temperature=cfg.temperature)
        width = samples.prompt_ids.shape[1]
        assert_close(
            f"{backend.name} behaviour vs trainer",
            trainer[:, width:],
            samples.logprobs,
            samples.completion_mask,
        )


def test_sampling_is_seeded_and_stops_at_eos(backends, checkpoint):
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, n=4)
    for backend in backends:
        model = backend.load_model(checkpoint)
        prompts = prompts_for(model)
        first = backend.sample(model, prompts, cfg, [-1], 0, seed=4)
        again = backend.sample(model, prompts, cfg, [-1], 0, seed=4)
        other = backend.sample(model, prompts, cfg, [-1], 0, seed=5)
        np.testing.assert_array_equal(first.completion_ids, again.completion_ids)
        assert (first.completion_ids != other.completion_ids).any()
        assert first.completion_ids.shape == (len(prompts) * cfg.n, cfg.max_new_tokens)
        # stop at EOS: take as EOS the first token of row 0 not seen before it, at step k
        row0 = first.completion_ids[0].tolist()
        k = next(i for i in range(1, len(row0)) if row0[i] not in row0[:i])
        eos = row0[k]
        stopped = backend.sample(model, prompts, cfg, [eos], 0, seed=4)
        live = stopped.completion_mask[0]
        assert stopped.finished[0] and live[: k + 1].all() and not live[k + 1 :].any()
        assert (stopped.completion_ids[0, k + 1 :] == 0).all() and (
            stopped.logprobs[0, k + 1 :] == 0
        ).all()
        for r in range(stopped.completion_ids.shape[0]):
            live = stopped.completion_mask[r] == 1
            hits = np.flatnonzero(stopped.completion_ids[r][live] == eos)
            if hits.size:  # nothing after the first EOS counts
                assert live.sum() == hits[0] + 1


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(max_new_tokens=1, temperature=0.5, n=4000),
        SamplingConfig(max_new_tokens=1, temperature=1.0, top_k=4, n=4000),
    ],
    ids=["temperature", "top-k"],
)
def test_first_tokens_follow_the_sampling_distribution(backends, checkpoint, cfg):
    """Counts of the first sampled token against its probability. Each sampled token's
    behaviour logprob gives its unfiltered probability p; under top-k the sampler draws from p
    renormalised over the k tokens. Every token seen must have been drawn within 5 binomial
    standard errors (+ 1 count) of n x its probability. (At temperature 0.5 the tiny models
    spread the draws over 60-320 tokens, none above 90% of them.)"""
    for backend in backends:
        model = backend.load_model(checkpoint)
        samples = backend.sample(model, prompts_for(model, (6,)), cfg, [-1], 0, seed=3)
        first = samples.completion_ids[:, 0]
        tokens, counts = np.unique(first, return_counts=True)
        p = np.array([np.exp(samples.logprobs[first == t, 0][0]) for t in tokens])
        if cfg.top_k:
            assert len(tokens) <= cfg.top_k, f"{backend.name}: sampled outside the top-k"
            p = p / p.sum()
        assert len(tokens) > 1, f"{backend.name}: one token only, nothing to compare"
        expected = cfg.n * p
        bound = 5 * np.sqrt(cfg.n * p * (1 - p)) + 1
        assert (np.abs(counts - expected) <= bound).all(), (
            f"{backend.name}: counts {counts.tolist()} vs expected {expected.round(1).tolist()}"
        )


def test_top_k_one_is_greedy(backends, checkpoint):
    for backend in backends:
        model = backend.load_model(checkpoint)
        prompts = prompts_for(model)
        greedy = backend.sample(
            model, prompts, SamplingConfig(max_new_tokens=8, temperature=0.0), [-1], 0, 0
        )
        top1 = backend.sample(
            model, prompts, SamplingConfig(max_new_tokens=8, temperature=0.9, top_k=1), [-1], 0, 0
        )
        np.testing.assert_array_equal(greedy.completion_ids, top1.completion_ids)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_parity_report_is_ok(checkpoint, backends, dtype):
    checks = ParityRun(ParitySetup(model=checkpoint, dtype=dtype), *backends).run()
    failed = [c for c in checks if not c.ok]
    assert not failed, "\n".join(
        f"{c.name}: max {c.max_abs_diff:.3g} > tol {c.tolerance:.3g} {c.detail}" for c in failed
    )


def test_parity_report_catches_a_wrong_weight(tiny_dir, backends):
    """The checks can fail: scale one MLX weight matrix by 1% and the logprob check must say so."""
    run = ParityRun(ParitySetup(model=str(tiny_dir / "tiny-gemma2")), *backends)
    name = "model.layers.0.mlp.down_proj.base_layer.weight"
    weights = backends[1].parameters(run.models[1])
    backends[1].set_parameters(run.models[1], {name: weights[name] * 1.01})
    check = run.check_logprobs(left=True)
    assert not check.ok and check.max_abs_diff > check.tolerance


def test_full_finetuning_gradients_match(backends, checkpoint):
    """Without LoRA every weight trains; tied embeddings collect both of their gradients."""
    models = load_pair(backends, checkpoint, lora=False)
    ids, mask = batch_for(models[0], left=True, seed=4, batch=2)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "loss_mask": prediction_mask(mask).astype(np.float32),
    }
    (ref_loss, _, ref_grads), (loss, _, grads) = (
        b.loss_and_grads(m, nll_loss, batch) for b, m in zip(backends, models)
    )
    assert_close("full fine-tuning loss", ref_loss, loss)
    assert sorted(ref_grads) == sorted(grads)
    trainable, total = backends[0].parameter_count(models[0])
    assert trainable == total == backends[1].parameter_count(models[1])[0]
    for name in ref_grads:
        scale = float(np.abs(ref_grads[name]).max())
        diff = np.abs(ref_grads[name] - grads[name])
        assert diff.max() <= RTOL * max(scale, 1e-3), (
            f"grad {name}: max {diff.max():.3g}, mean {diff.mean():.3g}, scale {scale:.3g}"
        )


def test_adapter_saved_by_peft_loads_in_both_backends(backends, checkpoint, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from mlxpost.backend import DEFAULT_LORA_TARGETS

    base = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager"
    )
    arch = base.config.model_type
    config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=list(DEFAULT_LORA_TARGETS[arch]),
        fan_in_fan_out=arch == "gpt2",
    )
    peft_model = peft.get_peft_model(base, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # PEFT starts B at zero; give it values so the adapter matters
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(str(tmp_path))
    ids, mask = batch_for(backends[0].load_model(checkpoint), left=False, batch=1)
    with torch.no_grad():
        expected = peft_model(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    for backend in backends:
        model = backend.load_model(checkpoint)
        backend.load_adapter(model, str(tmp_path))
        assert_close(
            f"peft adapter in {backend.name}", expected, backend.token_logits(model, ids, mask)
        )
