"""Cross-backend numerics checks: `mlxpost parity` and the parity test suite.

Both backends load the same checkpoint (and adapter) and compute, on the same
seeded token ids: per-token logprobs on right- and left-padded batches longer
than any sliding window, a loss and its gradients over the LoRA parameters
(also with every block checkpointed, and with the loss head in chunks), one
AdamW step, and greedy tokens. Each check reports the max and mean
absolute difference and the tolerance it is held to.

Tolerances (float32) follow from rounding: a float32 result carries a relative
error of a few 1e-7 per operation, and a forward pass chains a few thousand
of them, so values agree to about 1e-6 relative; checks allow 1e-5 of the
largest magnitude involved. bfloat16 keeps 8 mantissa bits (relative step
2^-8 = 0.4%); activations are rounded after every layer, so the backends can
differ by a couple of bf16 steps of the largest logit: checks allow 1e-2
relative, 2.5 steps (float16: 2e-3, its step being 2^-11). In half precision
the logprob and gradient tolerances are at least twice the reference
backend's own error against its float32 results on the same batch: two
correct half-precision computations may each be that far from the exact
values, in opposite directions.

Two checks would measure luck if they compared the backends' outputs directly,
because a function with a jump turns a rounding difference into a full one:
- AdamW's first update is lr * g / (|g| + eps), about lr * sign(g), so a gradient
  within the gradient tolerance of zero may change sign and move a weight by
  2 * lr. Each backend's step is instead held to float32 rounding against a
  numpy AdamW fed the gradient that backend stepped with, and the two stepped
  gradients are compared at the gradient tolerance.
- Greedy decoding takes an argmax, so where the two likeliest tokens are
  within the logprob tolerance of each other either backend may pick either.
  Such a near-tie is accepted where the tokens first differ (and the row is
  not compared further: the continuations differ from there); a divergence
  where either backend prefers its token by more than the tolerance fails.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from mlxpost.backend import Backend, LoraConfig, OptimConfig, SamplingConfig, get_backend
from mlxpost.backend_shared.training import learning_rate
from mlxpost.functional import nll_loss, prediction_mask

RELATIVE_TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}


@dataclass
class Check:
    name: str
    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float
    ok: bool
    detail: str = ""


@dataclass
class ParitySetup:
    model: str
    adapter: str | None = None
    dtype: str = "float32"
    seq_len: int | None = None  # default: longer than the sliding window
    batch_size: int = 3
    greedy_tokens: int = 32
    lora_rank: int = 4
    learning_rate: float = 1e-3
    seed: int = 0


def compare(name: str, reference, other, mask=None, tolerance=0.0, detail="") -> Check:
    """Max/mean abs difference over `mask` (all elements if None) against `tolerance`."""
    reference, other = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    diff = np.abs(reference - other)
    if mask is not None:
        diff = diff[np.asarray(mask).astype(bool)]
    max_diff = float(diff.max()) if diff.size else 0.0
    mean_diff = float(diff.mean()) if diff.size else 0.0
    ok = bool(np.isfinite(max_diff) and max_diff <= tolerance)
    return Check(name, max_diff, mean_diff, float(tolerance), ok, detail)


def relative_tolerance(values, rtol: float, mask=None) -> float:
    """`rtol` of the largest |value| (over `mask`), and at least `rtol` itself."""
    values = np.abs(np.asarray(values, np.float64))
    if mask is not None:
        values = values[np.asarray(mask).astype(bool)]
    scale = float(values.max()) if values.size else 1.0
    return rtol * max(scale, 1.0)


def adamw_first_step(weights, grads, cfg: OptimConfig, lr: float):
    """AdamW's first step from zero moments, in float64: (updated weights, m, v).

    Bias correction makes m_hat = g and v_hat = g^2, so the update is
    lr * g / (|g| + eps) whatever the betas; they show in the moments only.
    """
    weights, grads = np.asarray(weights, np.float64), np.asarray(grads, np.float64)
    m = (1 - cfg.beta1) * grads
    v = (1 - cfg.beta2) * grads**2
    m_hat, v_hat = m / (1 - cfg.beta1), v / (1 - cfg.beta2)
    updated = weights * (1 - lr * cfg.weight_decay) - lr * m_hat / (np.sqrt(v_hat) + cfg.eps)
    return updated, m, v


def compare_greedy(name: str, ref_ids, other_ids, next_logprobs, rtol: float) -> Check:
    """Greedy tokens of two backends; they may differ only where rounding can break a tie.

    Each row is compared up to its first differing token. There
    `next_logprobs(row, col)` gives both backends' (V,) logprobs for that
    position after the shared prefix. With `a` the reference's token and `b`
    the other's, each backend's margin logprob[a] - logprob[b] must be within
    the logprob tolerance (`rtol` of the largest |logprob| in the reference's
    row): a near-tie that either backend may break either way. The rest of
    such a row is not compared, since the continuations differ from there.
    Reported: the largest margin at a divergence, and that row's tolerance.
    """
    ref_ids, other_ids = np.asarray(ref_ids), np.asarray(other_ids)
    rows, length = ref_ids.shape
    equal, margins, tolerances, notes = 0, [], [], []
    for row in range(rows):
        differs = np.flatnonzero(ref_ids[row] != other_ids[row])
        if not differs.size:
            equal += length
            continue
        col = int(differs[0])
        equal += col
        ref_logprobs, other_logprobs = (np.asarray(x, np.float64) for x in next_logprobs(row, col))
        a, b = int(ref_ids[row, col]), int(other_ids[row, col])
        margin = max(
            abs(ref_logprobs[a] - ref_logprobs[b]), abs(other_logprobs[a] - other_logprobs[b])
        )
        tolerance = relative_tolerance(ref_logprobs, rtol)
        margins.append(margin)
        tolerances.append(tolerance)
        verdict = "near-tie, rest of row not compared" if margin <= tolerance else "clear"
        notes.append(
            f"row {row} token {col}: {a} vs {b}, margin {margin:.3g} "
            f"{'<=' if margin <= tolerance else '>'} {tolerance:.3g} ({verdict})"
        )
    margins, tolerances = np.array(margins), np.array(tolerances)
    largest = int(np.argmax(margins)) if margins.size else None
    return Check(
        name,
        float(margins[largest]) if largest is not None else 0.0,
        float(margins.mean()) if margins.size else 0.0,
        float(tolerances[largest]) if largest is not None else 0.0,
        bool((margins <= tolerances).all()),
        "; ".join([f"{equal}/{ref_ids.size} tokens equal", *notes]),
    )


def default_seq_len(config: dict) -> int:
    """Longer than any sliding window (so windowed layers are exercised), within the positions."""
    window = config.get("sliding_window") or 0
    limit = (
        config.get("max_position_embeddings")
        or config.get("n_positions")
        or config.get("n_ctx")
        or 1024
    )
    return int(min(max(48, window + 16), limit))


def token_batch(vocab_size: int, batch: int, length: int, seed: int, left: bool):
    """Seeded random ids with rows of decreasing length, padded on one side."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch, length)).astype(np.int32)
    mask = np.zeros((batch, length), np.int32)
    for row in range(batch):
        real = length - row * max(1, length // (2 * batch))
        if left:
            mask[row, length - real :] = 1
        else:
            mask[row, :real] = 1
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    return ids, mask


def parity_lora_init(params: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Non-zero lora_B so that gradients reach lora_A too (PEFT's init has B = 0).

    Each tensor's stream is keyed by (seed, name), so both backends get the same values
    whatever order they list their modules in (transformers' Phi-3 defines o_proj before
    qkv_proj, for one)."""
    out = {}
    for name, value in params.items():
        if name.endswith("lora_B.weight"):
            rng = np.random.default_rng([seed + 1, *name.encode()])
            out[name] = (rng.standard_normal(value.shape) * 0.02).astype(np.float32)
    return out


class ParityRun:
    """Loads one checkpoint in the reference (torch) and the other (mlx) backend."""

    def __init__(
        self, setup: ParitySetup, reference: Backend | None = None, other: Backend | None = None
    ):
        self.setup = setup
        self.reference = reference or get_backend("torch")
        self.other = other or get_backend("mlx")
        self.rtol = RELATIVE_TOLERANCE[setup.dtype]
        self.models = [b.load_model(setup.model, setup.dtype) for b in self.backends]
        self.config = self.models[0].config
        for backend, model in zip(self.backends, self.models):
            self.prepare_adapter(backend, model)
        self.seq_len = setup.seq_len or default_seq_len(self.config)
        self.vocab_size = int(self.config["vocab_size"])
        self._gradient_tolerance: tuple[float, str] | None = None

    def prepare_adapter(self, backend: Backend, model) -> None:
        """The given adapter, or a fresh one with non-zero B so every LoRA gradient is live."""
        if self.setup.adapter:
            backend.load_adapter(model, self.setup.adapter)
            return
        cfg = LoraConfig(rank=self.setup.lora_rank, alpha=2.0 * self.setup.lora_rank)
        backend.attach_lora(model, cfg, seed=self.setup.seed)
        backend.set_parameters(
            model, parity_lora_init(backend.parameters(model, True), self.setup.seed)
        )

    @property
    def backends(self):
        return (self.reference, self.other)

    def tolerance(self, reference_values, mask=None) -> float:
        return relative_tolerance(reference_values, self.rtol, mask)

    def check_logprobs(self, left: bool) -> Check:
        ids, mask = token_batch(
            self.vocab_size, self.setup.batch_size, self.seq_len, self.setup.seed, left
        )
        ref, other = (b.logprobs(m, ids, mask) for b, m in zip(self.backends, self.models))
        counted = prediction_mask(mask)
        side = "left" if left else "right"
        tolerance, detail = self.tolerance(ref, counted), ""
        if self.setup.dtype != "float32":
            exact = self.reference.logprobs(self.reference_float32, ids, mask)
            own_error = float(np.abs(exact - ref)[counted.astype(bool)].max())
            if 2 * own_error > tolerance:
                tolerance = 2 * own_error
                detail = f"tolerance: twice the reference backend's own {self.setup.dtype} error vs float32"
        return compare(
            f"logprobs ({side} padding, {self.seq_len} tokens)",
            ref,
            other,
            counted,
            tolerance,
            detail,
        )

    @cached_property
    def reference_float32(self):
        """The reference backend's float32 model with the same adapter: what a half-precision
        result would be without the rounding of its dtype."""
        model = self.reference.load_model(self.setup.model, "float32")
        self.prepare_adapter(self.reference, model)
        return model

    def grad_batch(self) -> dict:
        ids, mask = token_batch(
            self.vocab_size, self.setup.batch_size, self.seq_len, self.setup.seed + 2, True
        )
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "loss_mask": prediction_mask(mask).astype(np.float32),
        }

    def loss_and_grads(self):
        batch = self.grad_batch()
        return batch, [
            b.loss_and_grads(m, nll_loss, batch) for b, m in zip(self.backends, self.models)
        ]

    def check_loss_and_grads(self) -> list[Check]:
        _, ((ref_loss, _, ref_grads), (loss, _, grads)) = self.loss_and_grads()
        checks = [compare("loss (masked NLL)", ref_loss, loss, tolerance=self.tolerance(ref_loss))]
        missing = sorted(set(ref_grads) ^ set(grads))
        if missing:
            checks.append(
                Check(
                    "gradients",
                    float("inf"),
                    float("inf"),
                    0.0,
                    False,
                    f"names differ: {missing[:3]}",
                )
            )
            return checks
        names = sorted(ref_grads)
        ref_flat = np.concatenate([ref_grads[n].ravel() for n in names])
        flat = np.concatenate([grads[n].ravel() for n in names])
        tolerance, detail = self.gradient_tolerance(names, ref_flat)
        checks.append(
            compare(
                f"gradients ({len(names)} LoRA tensors)",
                ref_flat,
                flat,
                tolerance=tolerance,
                detail=detail,
            )
        )
        return checks

    def check_checkpointed_grads(self) -> Check:
        """Gradients with --grad-checkpoint (every block recomputed in the backward pass)."""
        return self.check_variant_grads(
            "gradients with --grad-checkpoint",
            "unchecked",
            lambda backend, model, on: backend.set_grad_checkpoint(model, on),
            (False, True, False),
        )

    def check_chunked_logits_grads(self) -> Check:
        """Gradients with the loss head in chunks of rows (--logits-chunk, each chunk
        recomputed in the backward pass) against those from the whole logits at once: a
        quarter of the batch's positions a chunk, so there are several."""
        positions = self.setup.batch_size * (self.seq_len - 1)
        rows = max(1, -(-positions // 4))
        return self.check_variant_grads(
            f"gradients with --logits-chunk {rows}",
            "whole-logits",
            lambda backend, model, value: backend.set_logits_chunk(model, value),
            (0, rows, None),
        )

    def check_variant_grads(self, name: str, plain_label: str, setter, values) -> Check:
        """Gradients with a memory option on: each backend's against its own with the option
        off, and the two backends' against each other, within the gradient check's tolerance.
        `setter(backend, model, value)` applies one of `values`: (off, on, the default)."""
        off, on, default = values
        batch = self.grad_batch()
        plain, variant = [], []
        for backend, model in zip(self.backends, self.models):
            try:
                for value, out in ((off, plain), (on, variant)):
                    setter(backend, model, value)
                    out.append(backend.loss_and_grads(model, nll_loss, batch)[2])
            finally:
                setter(backend, model, default)
        names = sorted(plain[0])
        if any(sorted(grads) != names for grads in (*plain, *variant)):
            return Check(name, float("inf"), float("inf"), 0.0, False, "gradient names differ")

        def flat(grads):
            return np.concatenate([grads[n].ravel() for n in names])

        tolerance, detail = self.gradient_tolerance(names, flat(plain[0]))
        ref, other = (b.name for b in self.backends)
        pairs = {
            f"{ref} vs its {plain_label}": (plain[0], variant[0]),
            f"{other} vs its {plain_label}": (plain[1], variant[1]),
            f"{ref} vs {other}": (variant[0], variant[1]),
        }
        parts = {
            key: compare(key, flat(a), flat(b), tolerance=tolerance)
            for key, (a, b) in pairs.items()
        }
        worst = max(parts.values(), key=lambda c: c.max_abs_diff)
        summary = "; ".join(f"{key} {c.max_abs_diff:.2e}" for key, c in parts.items())
        return Check(
            f"{name} ({len(names)} LoRA tensors)",
            worst.max_abs_diff,
            worst.mean_abs_diff,
            tolerance,
            all(c.ok for c in parts.values()),
            "; ".join(filter(None, (summary, detail))),
        )

    def gradient_tolerance(self, names, ref_flat) -> tuple[float, str]:
        """rtol of the largest gradient; in half precision at least twice the reference
        backend's own error against float32. Computed once and shared by the gradient
        and optimizer-step checks."""
        if self._gradient_tolerance is None:
            tolerance, detail = self.rtol * float(np.abs(ref_flat).max()), ""
            if self.setup.dtype != "float32":
                own_error = self.half_precision_gradient_error(names, ref_flat)
                if 2 * own_error > tolerance:
                    tolerance = 2 * own_error
                    detail = f"tolerance: twice the reference backend's own {self.setup.dtype} error vs float32"
            self._gradient_tolerance = (tolerance, detail)
        return self._gradient_tolerance

    def half_precision_gradient_error(self, names, half_grads) -> float:
        """Max |g_half - g_float32| of the reference backend: what the precision itself costs.

        Gradients flow back through every layer's half-precision activations,
        so their rounding grows with depth; two correct backends may differ by
        about as much as either differs from its own float32 computation.
        """
        batch = self.grad_batch()
        _, _, grads = self.reference.loss_and_grads(self.reference_float32, nll_loss, batch)
        exact = np.concatenate([grads[n].ravel() for n in names])
        return float(np.abs(exact - half_grads).max())

    def check_optimizer_step(self) -> list[Check]:
        """One AdamW step (with weight decay) from identical weights on the same batch.

        Comparing the two backends' updated weights with each other would measure
        luck in half precision: a gradient within the gradient tolerance of zero
        may change sign between them, and Adam's first update, about lr * sign(g),
        then moves that weight by 2 * lr. So the step is checked in two parts:
        - each backend's updated weights and second moment against
          `adamw_first_step` fed the gradient that backend stepped with, read back
          from its first moment m = (1 - beta1) * g. Both optimizers thus see
          identical inputs and are held to float32 rounding: 4 ulps of the weight
          plus 4e-5 * lr (1e-5, plus mlx's float32 bias corrections at the default
          betas), and 1e-5 relative for v. A wrong learning rate, eps, bias
          correction, weight decay or beta2 fails here;
        - the two stepped gradients against each other at the gradient check's
          tolerance: a sign flip within it passes, a step that computes another
          gradient (or a wrong beta1, which scales m) fails.
        """
        cfg = OptimConfig(
            learning_rate=self.setup.learning_rate,
            weight_decay=0.01,
            max_grad_norm=None,
            warmup_steps=0,
            total_steps=1,
        )
        lr = learning_rate(cfg, 0)
        # mlx forms the bias corrections 1 - beta^t in float32, losing the bits beta shares
        # with 1: relative error up to 2^-24 / (1 - beta), halved by the square root for beta2.
        update_rtol = 1e-5 + 2.0**-24 * (1 / (1 - cfg.beta1) + 0.5 / (1 - cfg.beta2))
        batch = self.grad_batch()
        # copies: the torch backend's arrays are views of its live CPU tensors
        before = {n: v.copy() for n, v in self.reference.parameters(self.models[0], True).items()}
        names = sorted(before)

        def flat(values: dict, prefix: str = "") -> np.ndarray:
            return np.concatenate([np.asarray(values[prefix + n]).ravel() for n in names])

        weights = flat(before).astype(np.float64)
        stepped_grads, afters, diffs, ratios, notes = [], [], [], [], []
        for backend, model in zip(self.backends, self.models):
            optimizer = backend.make_optimizer(model, cfg)
            backend.train_step(model, optimizer, nll_loss, [batch])
            state = backend.optimizer_state(optimizer)
            after = flat(backend.parameters(model, True)).astype(np.float64)
            backend.set_parameters(model, before)  # leave both models as they were
            if f"m.{names[0]}" not in state:  # a non-finite gradient makes a backend skip the step
                detail = f"{backend.name} took no step"
                return [Check("AdamW step", float("inf"), float("inf"), 0.0, False, detail)]
            grads = flat(state, "m.") / (1 - cfg.beta1)
            expected, _, expected_v = adamw_first_step(weights, grads, cfg, lr)
            weight_tol = 4 * np.spacing(np.abs(expected).astype(np.float32)) + update_rtol * lr
            v_tol = 1e-5 * expected_v + np.spacing(expected_v.astype(np.float32))
            weight_diff = np.abs(after - expected)
            v_diff = np.abs(flat(state, "v.") - expected_v)
            weight_ratio, v_ratio = np.max(weight_diff / weight_tol), np.max(v_diff / v_tol)
            stepped_grads.append(grads)
            afters.append(after)
            diffs.append((weight_diff, weight_tol))
            ratios.append(max(weight_ratio, v_ratio))
            notes.append(f"{backend.name} {weight_ratio:.2g} (weights), {v_ratio:.2g} (v)")
        weight_diff = np.concatenate([d for d, _ in diffs])
        weight_tol = np.concatenate([t for _, t in diffs])
        largest = int(np.argmax(weight_diff))
        step_check = Check(
            "AdamW step (each backend vs numpy AdamW)",
            float(weight_diff.max()),
            float(weight_diff.mean()),
            float(weight_tol[largest]),
            bool(max(ratios) <= 1.0),
            "tolerance per element (shown: at the largest difference); worst diff/tolerance: "
            + ", ".join(notes),
        )
        tolerance, _ = self.gradient_tolerance(names, stepped_grads[0])
        flips = int(np.sum(np.sign(stepped_grads[0]) != np.sign(stepped_grads[1])))
        gradient_check = compare(
            "AdamW step (gradients the two steps used)",
            stepped_grads[0],
            stepped_grads[1],
            tolerance=tolerance,
            detail=f"{flips} changed sign; updated weights differ by up to "
            f"{np.abs(afters[0] - afters[1]).max():.3g} (2 * lr = {2 * lr:.3g})",
        )
        return [step_check, gradient_check]

    def check_greedy(self) -> Check:
        rng = np.random.default_rng(self.setup.seed + 3)
        prompts = [rng.integers(0, self.vocab_size, size=n).tolist() for n in (7, 12)]
        cfg = SamplingConfig(max_new_tokens=self.setup.greedy_tokens, temperature=0.0)
        eos = [-1]  # never stop early: compare all tokens
        ref, other = (
            b.sample(m, prompts, cfg, eos, 0, 0) for b, m in zip(self.backends, self.models)
        )

        def next_logprobs(row: int, col: int):
            prefix = prompts[row] + ref.completion_ids[row, :col].tolist()
            ids = np.array([prefix], np.int32)
            logits = (
                b.token_logits(m, ids, np.ones_like(ids))[0, -1].astype(np.float64)
                for b, m in zip(self.backends, self.models)
            )
            return [x - x.max() - np.log(np.exp(x - x.max()).sum()) for x in logits]

        return compare_greedy(
            f"greedy decoding ({cfg.max_new_tokens} tokens)",
            ref.completion_ids,
            other.completion_ids,
            next_logprobs,
            self.rtol,
        )

    def run(self) -> list[Check]:
        checks = [self.check_logprobs(left=False), self.check_logprobs(left=True)]
        checks += self.check_loss_and_grads()
        checks.append(self.check_checkpointed_grads())
        checks.append(self.check_chunked_logits_grads())
        checks += self.check_optimizer_step()
        checks.append(self.check_greedy())
        return checks


def run_parity(setup: ParitySetup) -> dict:
    checks = ParityRun(setup).run()
    return {"ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]}


def format_table(report: dict) -> str:
    rows = [("check", "max abs diff", "mean abs diff", "tolerance", "")]
    for c in report["checks"]:
        rows.append(
            (
                c["name"],
                f"{c['max_abs_diff']:.3g}",
                f"{c['mean_abs_diff']:.3g}",
                f"{c['tolerance']:.3g}",
                "ok" if c["ok"] else "FAIL",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    for c in report["checks"]:
        if c["detail"]:
            lines.append(f"  {c['name']}: {c['detail']}")
    lines.append("parity: " + ("ok" if report["ok"] else "FAILED"))
    return "\n".join(lines)
