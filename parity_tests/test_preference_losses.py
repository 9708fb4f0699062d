"""Preference losses (DPO family, KTO, reward model) against numpy oracles written from the papers.

The oracles work in float64 on plain numpy, token by token and pair by pair, without
mlxpost's ops namespace; the losses run on numpy, torch and mlx ops.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlxpost.algorithms.dpo import dpo_loss, preference_objective
from mlxpost.algorithms.kto import kto_loss
from mlxpost.algorithms.preference import DPOConfig
from mlxpost.algorithms.rm import RMConfig, rm_loss
from mlxpost.functional import LogitsForward
from mlxpost.ops import NumpyOps

BETA = 0.5


def fixed_model(ops, logits=None, reference=None, scores=None, chunk=None):
    """A forward whose logits, reference logits and scores are given arrays."""
    frozen = {"reference": reference} if reference is not None else {}
    return LogitsForward(ops, logits, frozen=frozen, scores=scores, chunk=chunk)


# ---- oracles, from the papers' formulas ----


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sequence_logps(logits, ids, mask, average=False):
    """Sum (or mean) over completion tokens t of log softmax(logits[t - 1])[ids[t]]."""
    out = []
    for b in range(ids.shape[0]):
        total, count = 0.0, 0
        for t in range(1, ids.shape[1]):
            if mask[b, t]:
                z = logits[b, t - 1].astype(np.float64)
                total += z[ids[b, t]] - (z.max() + math.log(np.exp(z - z.max()).sum()))
                count += 1
        out.append(total / max(count, 1) if average else total)
    return np.array(out)


def oracle_pair_loss(h, loss, beta, eps):
    """Mean over pairs of the paired losses of h, one pair at a time."""
    values = []
    for x in h:
        if loss == "sigmoid":  # DPO (Rafailov et al.) / cDPO (Mitchell)
            values.append(-(1 - eps) * log_sigmoid(beta * x) - eps * log_sigmoid(-beta * x))
        elif loss == "ipo":  # Azar et al., eq. 17
            values.append((x - 1 / (2 * beta)) ** 2)
        elif loss == "hinge":  # SLiC-HF
            values.append(max(0.0, 1 - beta * x))
        elif loss == "robust":  # Chowdhury et al., 2024, eq. 8
            values.append(
                ((1 - eps) * -log_sigmoid(beta * x) - eps * -log_sigmoid(-beta * x)) / (1 - 2 * eps)
            )
    return float(np.mean(values))


def oracle_kto(policy, ref, labels, policy_kl, ref_kl, beta, w_d, w_u):
    """KTO (Ethayarajh et al., 2024, eq. 8) with z0 = max(0, mean mismatched log-ratio)."""
    z0 = max(0.0, float(np.mean(policy_kl - ref_kl)))
    values = []
    for p, r, label in zip(policy, ref, labels):
        reward = p - r
        if label:
            values.append(w_d * (1 - 1 / (1 + math.exp(-beta * (reward - z0)))))
        else:
            values.append(w_u * (1 - 1 / (1 + math.exp(-beta * (z0 - reward)))))
    return float(np.mean(values)), z0


def oracle_rm(scores, last, margin, coef):
    """Bradley-Terry with margin, plus Eisenstein et al.'s centring term."""
    pairs = len(margin)
    r = [scores[i, last[i]] for i in range(2 * pairs)]
    chosen, rejected = r[:pairs], r[pairs:]
    nll = np.mean([-log_sigmoid(c - j - m) for c, j, m in zip(chosen, rejected, margin)])
    centring = np.mean([(c + j) ** 2 for c, j in zip(chosen, rejected)])
    accuracy = np.mean([c > j for c, j in zip(chosen, rejected)])
    return float(nll + coef * centring), float(accuracy)


# ---- batches ----


def random_rows(seed, rows=6, width=10, vocab=11):
    """Logits, reference logits, ids and completion masks of `rows` sequences."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, size=(rows, width, vocab)).astype(np.float32)
    reference = (logits + rng.normal(0, 1.0, size=logits.shape)).astype(np.float32)
    ids = rng.integers(0, vocab, size=(rows, width)).astype(np.int32)
    mask = np.zeros((rows, width), np.float32)
    for row in range(rows):
        start = 3 + row % 3
        mask[row, start : width - row % 2] = 1.0  # completions of different lengths
    return logits, reference, ids, mask


def run_loss(loss_fn, ops, convert, model_arrays, batch, cfg):
    arrays = {k: convert(v) for k, v in model_arrays.items()}
    forward = fixed_model(ops, **arrays, chunk=7)  # rows of 9 predictions: chunks straddle rows
    loss, metrics = loss_fn(ops, forward, {k: convert(v) for k, v in batch.items()}, cfg)
    return float(ops.to_numpy(loss)), {k: float(ops.to_numpy(v)) for k, v in metrics.items()}


PAIR_CASES = [
    dict(loss="sigmoid"),
    dict(loss="sigmoid", label_smoothing=0.2),
    dict(loss="ipo"),
    dict(loss="hinge"),
    dict(loss="robust", label_smoothing=0.2),
]


@pytest.mark.parametrize("overrides", PAIR_CASES, ids=lambda c: ",".join(map(str, c.values())))
@pytest.mark.parametrize("mode", ["precompute", "live"])
def test_pair_losses_match_the_oracle(overrides, mode, array_backends):
    cfg = DPOConfig(beta=BETA, reference_mode=mode, **overrides)
    logits, reference, ids, mask = random_rows(0)
    average = cfg.loss == "ipo"  # IPO's h uses per-token mean logprobs
    policy = sequence_logps(logits, ids, mask, average)
    ref = sequence_logps(reference, ids, mask, average)
    h = (policy[:3] - ref[:3]) - (policy[3:] - ref[3:])
    expected = oracle_pair_loss(h, cfg.loss, cfg.beta, cfg.label_smoothing)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": mask}
    arrays = {"logits": logits}
    if mode == "precompute":
        batch["ref_logps"] = ref.astype(np.float32)
    else:
        arrays["reference"] = reference
    if cfg.loss == "hinge":  # both sides of the hinge are exercised
        assert (BETA * h > 1).any() and (BETA * h < 1).any(), h
    assert (h > 0).any() and (h < 0).any(), h
    for name, ops, convert in array_backends:
        got, metrics = run_loss(dpo_loss, ops, convert, arrays, batch, cfg)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), f"{name}: {got} vs {expected}"
        assert metrics["accuracy"] == pytest.approx(np.mean(h > 0)), name
        assert metrics["reward_margin"] == pytest.approx(BETA * h.mean(), rel=1e-5, abs=1e-6)
        assert metrics["reward_chosen"] == pytest.approx(
            BETA * (policy[:3] - ref[:3]).mean(), rel=1e-5, abs=1e-6
        )


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_rpo_adds_the_chosen_per_token_nll(loss, array_backends):
    """RPO (Pang et al., 2024): the paired loss + alpha * mean over pairs of the chosen
    completion's length-normalised NLL."""
    alpha = 0.7
    cfg = DPOConfig(beta=BETA, loss=loss, nll_alpha=alpha)
    logits, reference, ids, mask = random_rows(1)
    average = loss == "ipo"
    policy = sequence_logps(logits, ids, mask, average)
    ref = sequence_logps(reference, ids, mask, average)
    h = (policy[:3] - ref[:3]) - (policy[3:] - ref[3:])
    nll = -float(np.mean(sequence_logps(logits[:3], ids[:3], mask[:3], average=True)))
    expected = oracle_pair_loss(h, loss, BETA, 0.0) + alpha * nll
    batch = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "loss_mask": mask,
        "ref_logps": ref.astype(np.float32),
    }
    for name, ops, convert in array_backends:
        got, metrics = run_loss(dpo_loss, ops, convert, {"logits": logits}, batch, cfg)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), f"{name}: {got} vs {expected}"
        assert metrics["nll_chosen"] == pytest.approx(nll, rel=1e-5), name


def test_without_smoothing_robust_and_cdpo_are_dpo():
    h = np.array([-2.0, 0.3, 4.0])
    zeros = np.zeros(3)
    plain = preference_objective(NumpyOps, h, zeros, zeros, zeros, "sigmoid", BETA)[0]
    for loss in ("sigmoid", "robust"):
        smoothed = preference_objective(NumpyOps, h, zeros, zeros, zeros, loss, BETA, 0.0)[0]
        assert smoothed == pytest.approx(plain, rel=1e-12)
    assert plain == pytest.approx(oracle_pair_loss(h, "sigmoid", BETA, 0.0), rel=1e-12)


@pytest.mark.parametrize(
    "mode,z0_active",
    [("precompute", True), ("precompute", False), ("live", None)],
    ids=["precompute,z0>0", "precompute,z0=0", "live"],
)
def test_kto_matches_the_oracle(mode, z0_active, array_backends):
    cfg = DPOConfig(
        loss="kto", beta=BETA, desirable_weight=1.0, undesirable_weight=1.3, reference_mode=mode
    )
    logits, reference, ids, mask = random_rows(1)
    policy = sequence_logps(logits, ids, mask)
    ref = sequence_logps(reference, ids, mask)
    if z0_active is not None:
        # rows [3, 6) are the mismatched pairs; shift their (precomputed) reference so the
        # mean log-ratio, z0 before clamping, is clearly positive or negative
        ref[3:] += np.mean(policy[3:] - ref[3:]) + (-2.0 if z0_active else 2.0)
    labels = np.array([1.0, 0.0, 1.0], np.float32)
    expected, z0 = oracle_kto(policy[:3], ref[:3], labels, policy[3:], ref[3:], BETA, 1.0, 1.3)
    if z0_active is not None:
        assert (z0 > 0) == z0_active
    batch = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "loss_mask": mask,
        "label": labels,
    }
    arrays = {"logits": logits}
    if mode == "precompute":
        batch["ref_logps"] = ref.astype(np.float32)
    else:
        arrays["reference"] = reference
    for name, ops, convert in array_backends:
        got, metrics = run_loss(kto_loss, ops, convert, arrays, batch, cfg)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), f"{name}: {got} vs {expected}"
        assert metrics["kl"] == pytest.approx(z0, rel=1e-5, abs=1e-6), name


def test_kto_reference_point_carries_no_gradient():
    torch = pytest.importorskip("torch")
    from mlxpost.algorithms.kto import kto_objective
    from torch_backend.ops import TorchOps

    ops = TorchOps(torch.device("cpu"))
    policy = torch.tensor([-3.0, -5.0, -4.0], requires_grad=True)
    mismatched = torch.tensor([-6.0, -2.0, -7.0], requires_grad=True)
    ref = torch.tensor([-3.5, -4.0, -4.2])
    ref_mismatched = torch.tensor([-8.0, -3.0, -9.0])  # z0 = 5/3 > 0: the clamp is inactive
    labels = torch.tensor([1.0, 0.0, 1.0])
    loss, metrics = kto_objective(ops, policy, ref, labels, mismatched, ref_mismatched, BETA)
    assert float(metrics["kl"]) == pytest.approx(5.0 / 3.0)
    loss.backward()
    assert mismatched.grad is None or torch.all(mismatched.grad == 0)
    # desirable completions gain from a higher logprob, undesirable ones lose
    assert policy.grad[0] < 0 and policy.grad[2] < 0 and policy.grad[1] > 0


@pytest.mark.parametrize("coef", [0.0, 0.05])
def test_reward_model_loss_matches_the_oracle(coef, array_backends):
    rng = np.random.default_rng(7)
    pairs, width = 4, 7
    scores = rng.normal(0, 1.5, size=(2 * pairs, width)).astype(np.float32)
    last = np.array([6, 3, 5, 6, 2, 6, 4, 6], np.int32)
    margin = np.array([0.0, 1.0, 0.5, 0.0], np.float32)  # the optional margin column
    expected, accuracy = oracle_rm(scores, last, margin, coef)
    assert 0 < accuracy < 1
    ids = np.zeros((2 * pairs, width), np.int32)
    batch = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "last_index": last,
        "margin": margin,
    }
    cfg = RMConfig(centring_coef=coef)
    for name, ops, convert in array_backends:
        got, metrics = run_loss(rm_loss, ops, convert, {"scores": scores}, batch, cfg)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), f"{name}: {got} vs {expected}"
        assert metrics["accuracy"] == pytest.approx(accuracy), name


def test_raising_the_chosen_logprob_lowers_the_sigmoid_loss():
    chosen, rejected = np.array([-10.0, -4.0]), np.array([-9.0, -6.0])
    ref_c, ref_r = np.array([-9.5, -5.0]), np.array([-9.0, -5.5])

    def loss(c, r):
        return float(preference_objective(NumpyOps, c, r, ref_c, ref_r, "sigmoid", BETA)[0])

    base = loss(chosen, rejected)
    assert loss(chosen + 0.1, rejected) < base
    assert loss(chosen, rejected + 0.1) > base
    torch = pytest.importorskip("torch")
    from torch_backend.ops import TorchOps

    c = torch.tensor(chosen, requires_grad=True)
    r = torch.tensor(rejected, requires_grad=True)
    value, _ = preference_objective(
        TorchOps(torch.device("cpu")),
        c,
        r,
        torch.tensor(ref_c),
        torch.tensor(ref_r),
        "sigmoid",
        BETA,
    )
    value.backward()
    assert torch.all(c.grad < 0) and torch.all(r.grad > 0)
