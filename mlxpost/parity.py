"""Cross-backend numerics checks: `mlxpost parity` and the parity test suite.

Both backends load the same checkpoint (and adapter) and compute, on the same
seeded token ids: per-token logprobs on right- and left-padded batches longer
than any sliding window, a loss and its gradients over the LoRA parameters,
one AdamW step, and greedy tokens. Each check reports the max and mean
absolute difference and the tolerance it is held to.

Tolerances (float32) follow from rounding: a float32 result carries a relative
error of a few 1e-7 per operation, and a forward pass chains a few thousand
of them, so values agree to about 1e-6 relative; checks allow 1e-5 of the
largest magnitude involved. bfloat16 keeps 8 mantissa bits (relative step
2^-8 = 0.4%); activations are rounded after every layer, so the backends can
differ by a couple of bf16 steps of the largest logit: checks allow 1e-2
relative, 2.5 steps (float16: 2e-3, its step being 2^-11).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from mlxpost.backend import Backend, LoraConfig, OptimConfig, SamplingConfig, get_backend
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
    """Non-zero lora_B so that gradients reach lora_A too (PEFT's init has B = 0)."""
    rng = np.random.default_rng(seed + 1)
    out = {}
    for name, value in params.items():
        if name.endswith("lora_B.weight"):
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
        values = np.abs(np.asarray(reference_values))
        if mask is not None:
            values = values[np.asarray(mask).astype(bool)]
        scale = float(values.max()) if values.size else 1.0
        return self.rtol * max(scale, 1.0)

    def check_logprobs(self, left: bool) -> Check:
        ids, mask = token_batch(
            self.vocab_size, self.setup.batch_size, self.seq_len, self.setup.seed, left
        )
        ref, other = (b.logprobs(m, ids, mask) for b, m in zip(self.backends, self.models))
        counted = prediction_mask(mask)
        side = "left" if left else "right"
        return compare(
            f"logprobs ({side} padding, {self.seq_len} tokens)",
            ref,
            other,
            counted,
            self.tolerance(ref, counted),
        )

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
        tolerance, detail = self.rtol * float(np.abs(ref_flat).max()), ""
        if self.setup.dtype != "float32":
            own_error = self.half_precision_gradient_error(names, ref_flat)
            if 2 * own_error > tolerance:
                tolerance = 2 * own_error
                detail = f"tolerance: twice the reference backend's own {self.setup.dtype} error vs float32"
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

    def half_precision_gradient_error(self, names, half_grads) -> float:
        """Max |g_half - g_float32| of the reference backend: what the precision itself costs.

        Gradients flow back through every layer's half-precision activations,
        so their rounding grows with depth; two correct backends may differ by
        about as much as either differs from its own float32 computation.
        """
        model = self.reference.load_model(self.setup.model, "float32")
        self.prepare_adapter(self.reference, model)
        _, _, grads = self.reference.loss_and_grads(model, nll_loss, self.grad_batch())
        exact = np.concatenate([grads[n].ravel() for n in names])
        return float(np.abs(exact - half_grads).max())

    def check_optimizer_step(self) -> Check:
        """One AdamW step from identical weights on the same batch.

        Adam's first update is lr * g / (|g| + eps): where |g| is near eps the
        update is sensitive to the gradient's last bits, so each element's
        tolerance propagates the gradient tolerance through that derivative
        (capped at the 2 * lr an update can differ by at most).
        """
        batch, ((_, _, ref_grads), _) = self.loss_and_grads()
        cfg = OptimConfig(learning_rate=self.setup.learning_rate, max_grad_norm=None, total_steps=1)
        before = self.reference.parameters(self.models[0], True)
        after = []
        for backend, model in zip(self.backends, self.models):
            optimizer = backend.make_optimizer(model, cfg)
            backend.train_step(model, optimizer, nll_loss, [batch])
            after.append(backend.parameters(model, True))
            backend.set_parameters(model, before)  # leave both models as they were
        names = sorted(before)
        grad = np.concatenate([ref_grads[n].ravel() for n in names])
        ref_after = np.concatenate([after[0][n].ravel() for n in names])
        other_after = np.concatenate([after[1][n].ravel() for n in names])
        grad_tol = self.rtol * float(np.abs(grad).max())
        weight_ulp = np.spacing(np.abs(ref_after).astype(np.float32)).astype(np.float64)
        per_element = 4 * weight_ulp + cfg.learning_rate * np.minimum(
            2.0, grad_tol / (np.abs(grad) + cfg.eps)
        )
        diff = np.abs(ref_after.astype(np.float64) - other_after)
        largest = int(np.argmax(diff))
        ratio = float(np.max(diff / per_element))
        return Check(
            "AdamW step (updated LoRA weights)",
            float(diff.max()),
            float(diff.mean()),
            float(per_element[largest]),
            bool(ratio <= 1.0),
            f"tolerance is per element (shown: at the largest difference); worst diff/tolerance {ratio:.3g}",
        )

    def check_greedy(self) -> Check:
        rng = np.random.default_rng(self.setup.seed + 3)
        prompts = [rng.integers(0, self.vocab_size, size=n).tolist() for n in (7, 12)]
        cfg = SamplingConfig(max_new_tokens=self.setup.greedy_tokens, temperature=0.0)
        eos = [-1]  # never stop early: compare all tokens
        ref, other = (
            b.sample(m, prompts, cfg, eos, 0, 0) for b, m in zip(self.backends, self.models)
        )
        mismatched = ref.completion_ids != other.completion_ids
        count = int(mismatched.sum())
        detail = f"{ref.completion_ids.size - count}/{ref.completion_ids.size} tokens equal"
        if count:
            row, col = np.argwhere(mismatched)[0]
            detail += f"; first difference in prompt {row} at token {col}"
        return Check(
            f"greedy decoding ({cfg.max_new_tokens} tokens)",
            float(count),
            count / mismatched.size,
            0.0,
            count == 0,
            detail,
        )

    def run(self) -> list[Check]:
        checks = [self.check_logprobs(left=False), self.check_logprobs(left=True)]
        checks += self.check_loss_and_grads()
        checks.append(self.check_optimizer_step())
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
