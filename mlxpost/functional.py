"""Functionals shared by every algorithm, written once over an ops namespace.

All arrays are aligned with `input_ids` (B, T): the logprob of token t sits at
column t and is computed from the logits at t-1 (column 0 has no prediction
and is always 0). Masks are 0/1 arrays of the same shape; a column counts only
where its mask is 1, so prompts, padding and tokens after EOS never count.
"""

from __future__ import annotations

import math


def token_logprobs(ops, logits, input_ids, temperature: float = 1.0):
    """log_softmax(logits[t-1] / temperature)[token t] in float32, shape (B, T)."""
    logits = ops.float32(logits[:, :-1, :])  # (B, T-1, V)
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, 1:, None]  # (B, T-1, 1)
    picked = ops.take_along_axis(logits, targets, axis=-1)[..., 0]  # (B, T-1)
    logprobs = picked - ops.logsumexp(logits, axis=-1)  # (B, T-1)
    return ops.concatenate([ops.zeros((logprobs.shape[0], 1)), logprobs], axis=1)


def token_entropy(ops, logits, temperature: float = 1.0):
    """Entropy of the next-token distribution predicting token t, aligned like logprobs."""
    logits = ops.float32(logits[:, :-1, :])
    if temperature != 1.0:
        logits = logits / temperature
    log_p = ops.log_softmax(logits, axis=-1)  # (B, T-1, V)
    entropy = -ops.sum(ops.exp(log_p) * log_p, axis=-1)  # (B, T-1)
    return ops.concatenate([ops.zeros((entropy.shape[0], 1)), entropy], axis=1)


def token_kl(ops, logits, other_logits, temperature: float = 1.0):
    """KL(p || q) between the next-token distributions of two models at every position,
    summed over the vocabulary, aligned like logprobs (p from `logits`, q from `other_logits`)."""
    log_p = ops.log_softmax(ops.float32(logits[:, :-1, :]) / temperature, axis=-1)  # (B, T-1, V)
    log_q = ops.log_softmax(ops.float32(other_logits[:, :-1, :]) / temperature, axis=-1)
    kl = ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)  # (B, T-1)
    return ops.concatenate([ops.zeros((kl.shape[0], 1)), kl], axis=1)


def token_jsd(ops, student_logits, teacher_logits, beta: float = 0.5, temperature: float = 1.0):
    """Generalised Jensen-Shannon divergence per position, aligned like logprobs (GKD,
    Agarwal et al., 2024): beta * KL(P || M) + (1 - beta) * KL(Q || M), M = beta P + (1 - beta) Q,
    P the teacher's and Q the student's next-token distribution; 0 < beta < 1."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"the JSD mixing coefficient must be in (0, 1), got {beta}")
    log_q = ops.log_softmax(ops.float32(student_logits[:, :-1, :]) / temperature, axis=-1)
    log_p = ops.log_softmax(ops.float32(teacher_logits[:, :-1, :]) / temperature, axis=-1)
    # log M = logsumexp(log beta + log P, log(1 - beta) + log Q), elementwise and stable.
    a, b = log_p + math.log(beta), log_q + math.log(1.0 - beta)
    high = ops.maximum(a, b)
    log_m = high + ops.log(ops.exp(a - high) + ops.exp(b - high))
    jsd = beta * ops.sum(ops.exp(log_p) * (log_p - log_m), axis=-1) + (1.0 - beta) * ops.sum(
        ops.exp(log_q) * (log_q - log_m), axis=-1
    )
    return ops.concatenate([ops.zeros((jsd.shape[0], 1)), jsd], axis=1)


def masked_sum(ops, values, mask, axis=None):
    return ops.sum(values * ops.float32(mask), axis=axis)


def masked_mean(ops, values, mask, axis=None):
    """Mean over the positions where mask is 1 (0 when there are none)."""
    mask = ops.float32(mask)
    count = ops.sum(mask, axis=axis)
    return ops.sum(values * mask, axis=axis) / ops.maximum(count, 1.0)


def kl_estimate(ops, logprobs, ref_logprobs, estimator: str = "k3"):
    """Per-token estimate of KL(policy || reference) from tokens sampled from the policy.

    k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) - 1 + log r with
    log r = logprobs - ref_logprobs (Schulman, "Approximating KL divergence", 2020).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * ops.square(log_ratio)
    if estimator == "k3":
        return ops.exp(-log_ratio) - 1.0 + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose k1, k2 or k3")


def last_token_index(mask):
    """Index of the last 1 in each row of a numpy 0/1 mask (left or right padding)."""
    import numpy as np

    mask = np.asarray(mask)
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise ValueError(f"rows {empty.tolist()} have no tokens")
    width = mask.shape[1]
    return width - 1 - np.argmax(mask[:, ::-1], axis=1)


def prediction_mask(attention_mask):
    """Numpy 0/1 mask of tokens that have a real predecessor to be predicted from.

    The first real token of a row has no prediction (its column holds a value
    computed from a padding position), so it never counts in a loss. A packed row's
    attention mask holds segment ids (0 padding, k the k-th example): the first token of
    each segment has no predecessor in its own example and does not count either.
    """
    import numpy as np

    mask = np.asarray(attention_mask).astype(np.int32)
    out = np.zeros_like(mask)
    out[:, 1:] = (mask[:, 1:] > 0) & (mask[:, 1:] == mask[:, :-1])
    return out


def nll_loss(ops, forward, batch):
    """Mean negative log-likelihood over `loss_mask` tokens (SFT, perplexity).

    batch: input_ids (B, T), attention_mask (B, T), loss_mask (B, T).
    """
    logits = forward.logits(batch["input_ids"], batch["attention_mask"])
    logprobs = token_logprobs(ops, logits, batch["input_ids"])
    loss = -masked_mean(ops, logprobs, batch["loss_mask"])
    return loss, {"nll": loss}
