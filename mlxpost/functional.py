"""Functionals shared by every algorithm, written once over an ops namespace.

All arrays are aligned with `input_ids` (B, T): the logprob of token t sits at
column t and is computed from the logits at t-1 (column 0 has no prediction
and is always 0). Masks are 0/1 arrays of the same shape; a column counts only
where its mask is 1, so prompts, padding and tokens after EOS never count.
"""

from __future__ import annotations

import math

from mlxpost.backend_shared.heads import row_chunks


def _row_logprobs(ops, logits, targets):
    """log_softmax(logits)[target] per row: logits (..., V) float32, targets (..., 1) -> (...)."""
    picked = ops.take_along_axis(logits, targets, axis=-1)[..., 0]
    return picked - ops.logsumexp(logits, axis=-1)


def _row_entropy(ops, logits):
    """Entropy of softmax(logits) per row: (..., V) -> (...)."""
    log_p = ops.log_softmax(logits, axis=-1)
    return -ops.sum(ops.exp(log_p) * log_p, axis=-1)


def _row_kl(ops, logits, other_logits):
    """KL(p || q) per row, p = softmax(logits), q = softmax(other_logits): (..., V) -> (...)."""
    log_p = ops.log_softmax(logits, axis=-1)
    log_q = ops.log_softmax(other_logits, axis=-1)
    return ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)


def _row_jsd(ops, student_logits, teacher_logits, beta: float):
    """Generalised Jensen-Shannon divergence per row (GKD, Agarwal et al., 2024):
    beta * KL(P || M) + (1 - beta) * KL(Q || M), M = beta P + (1 - beta) Q, P the teacher's and
    Q the student's distribution; 0 < beta < 1."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"the JSD mixing coefficient must be in (0, 1), got {beta}")
    log_q = ops.log_softmax(student_logits, axis=-1)
    log_p = ops.log_softmax(teacher_logits, axis=-1)
    # log M = logsumexp(log beta + log P, log(1 - beta) + log Q), elementwise and stable.
    a, b = log_p + math.log(beta), log_q + math.log(1.0 - beta)
    high = ops.maximum(a, b)
    log_m = high + ops.log(ops.exp(a - high) + ops.exp(b - high))
    return beta * ops.sum(ops.exp(log_p) * (log_p - log_m), axis=-1) + (1.0 - beta) * ops.sum(
        ops.exp(log_q) * (log_q - log_m), axis=-1
    )


def _scaled(ops, logits, temperature: float):
    """float32 logits divided by the temperature (not divided at 1: the same numbers)."""
    logits = ops.float32(logits)
    return logits / temperature if temperature != 1.0 else logits


def _aligned(ops, per_row):
    """(B, T-1) values of the predictions at columns 0..T-2 -> (B, T) aligned with input_ids:
    the value predicting token t at column t, column 0 (no prediction) 0."""
    return ops.concatenate([ops.zeros((per_row.shape[0], 1)), per_row], axis=1)


def token_logprobs(ops, logits, input_ids, temperature: float = 1.0):
    """log_softmax(logits[t-1] / temperature)[token t] in float32, shape (B, T)."""
    targets = input_ids[:, 1:, None]  # (B, T-1, 1)
    return _aligned(ops, _row_logprobs(ops, _scaled(ops, logits[:, :-1, :], temperature), targets))


def token_entropy(ops, logits, temperature: float = 1.0):
    """Entropy of the next-token distribution predicting token t, aligned like logprobs."""
    return _aligned(ops, _row_entropy(ops, _scaled(ops, logits[:, :-1, :], temperature)))


def token_kl(ops, logits, other_logits, temperature: float = 1.0):
    """KL(p || q) between the next-token distributions of two models at every position,
    summed over the vocabulary, aligned like logprobs (p from `logits`, q from `other_logits`)."""
    p = ops.float32(logits[:, :-1, :]) / temperature
    q = ops.float32(other_logits[:, :-1, :]) / temperature
    return _aligned(ops, _row_kl(ops, p, q))


def token_jsd(ops, student_logits, teacher_logits, beta: float = 0.5, temperature: float = 1.0):
    """Generalised Jensen-Shannon divergence per position (_row_jsd), aligned like logprobs."""
    student = ops.float32(student_logits[:, :-1, :]) / temperature
    teacher = ops.float32(teacher_logits[:, :-1, :]) / temperature
    return _aligned(ops, _row_jsd(ops, student, teacher, beta))


DIVERGENCES = ("kl", "kl_from_other", "jsd")


def head_terms(
    ops,
    forward,
    input_ids,
    attention_mask,
    *,
    role: str | None = None,
    hidden=None,
    temperature: float = 1.0,
    entropy: bool = False,
    other: str | None = None,
    divergence: str = "kl",
    beta: float = 0.5,
    divergence_temperature: float | None = None,
):
    """Per-token quantities of a model's language-model head, aligned like logprobs (B, T),
    without ever holding the whole (B, T, vocab) logits: the forward maps the head over chunks
    of rows (positions), and a training step recomputes each chunk in its backward pass
    (Forward.map_head_rows), so the loss head's memory is O(chunk x vocab). The numbers are
    those of token_logprobs, token_entropy, token_kl and token_jsd on the full logits.

    The model is the trained one (role None) or the frozen model attached for `role`, its final
    hidden states `hidden` (B, T, H) when the caller already has them. Returns a dict:
    - "logprobs": log_softmax(logits / temperature)[next token];
    - "entropy" (entropy=True): of the same distribution, carrying no gradient (a metric);
    - "divergence" (other: a frozen role such as "reference" or "teacher"), both models'
      logits divided by `divergence_temperature` (default: the temperature): "kl"
      KL(model || other), "kl_from_other" KL(other || model), "jsd" the generalised JSD with
      the other model as teacher (beta).
    """
    if other is not None and divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    if hidden is None:
        hidden = (
            forward.hidden(input_ids, attention_mask)
            if role is None
            else forward.frozen_hidden(role, input_ids, attention_mask)
        )
    batch, width = input_ids.shape
    count = batch * (width - 1)
    rows = hidden[:, :-1].reshape(count, hidden.shape[-1])
    targets = input_ids[:, 1:].reshape(count, 1)
    other_rows = None
    if other is not None:
        other_hidden = forward.frozen_hidden(other, input_ids, attention_mask)
        other_rows = other_hidden[:, :-1].reshape(count, other_hidden.shape[-1])
    # Only the positions whose next token is real, where the backend says which (a batch that
    # is mostly padding: backend_shared/unpad.py); the others' terms are 0.
    selected = getattr(forward, "head_rows", lambda mask: None)(attention_mask)
    if selected is not None:
        keep, put_back = selected
        rows, targets = rows[keep], targets[keep]
        other_rows = None if other_rows is None else other_rows[keep]

    if divergence_temperature is None:
        divergence_temperature = temperature

    def terms(rows_chunk, chunk):  # chunk: the slice of rows these are
        raw = forward.head(rows_chunk, role)  # float32 (n, V)
        logits = _scaled(ops, raw, temperature)
        out = {"logprobs": _row_logprobs(ops, logits, targets[chunk])}
        if entropy:
            out["entropy"] = _row_entropy(ops, ops.stop_gradient(logits))
        if other_rows is not None:
            ours = raw / divergence_temperature
            theirs = ops.stop_gradient(forward.head(other_rows[chunk], other))
            theirs = theirs / divergence_temperature
            if divergence == "kl":
                out["divergence"] = _row_kl(ops, ours, theirs)
            elif divergence == "kl_from_other":
                out["divergence"] = _row_kl(ops, theirs, ours)
            else:
                out["divergence"] = _row_jsd(ops, ours, theirs, beta)
        return out

    per_row = forward.map_head_rows(terms, rows, role)
    if selected is not None:
        zero = ops.zeros((1,))
        per_row = {
            name: ops.concatenate([value, zero], axis=0)[put_back]
            for name, value in per_row.items()
        }
    return {name: _aligned(ops, value.reshape(batch, width - 1)) for name, value in per_row.items()}


class LogitsForward:
    """A Forward over logits already computed (oracles, tests, a loss over another engine's
    logits): its hidden states are the (B, T, V) logits themselves and its head is the
    identity (float32), so head_terms gives exactly token_logprobs' numbers. `frozen` maps a
    role ("reference", "teacher") to that model's logits; `scores` are scalar-head outputs
    (B, T); `chunk` rows at a time through head_terms (None: all at once)."""

    def __init__(self, ops, logits, frozen=None, scores=None, chunk: int | None = None):
        self.ops, self._logits, self._frozen = ops, logits, dict(frozen or {})
        self._scores, self.chunk = scores, chunk

    def hidden(self, input_ids, attention_mask):
        return self._logits

    def hidden_and_scores(self, input_ids, attention_mask):
        return self._logits, self._scores

    def scores(self, input_ids, attention_mask):
        return self._scores

    def frozen_hidden(self, role, input_ids, attention_mask):
        if role not in self._frozen:
            raise ValueError(f"no {role} model attached")
        return self.ops.stop_gradient(self._frozen[role])

    def head(self, hidden, role=None):
        logits = self.ops.float32(hidden)
        return logits if role is None else self.ops.stop_gradient(logits)

    def map_head_rows(self, fn, rows, role=None):
        count = rows.shape[0]
        pieces = [fn(rows[c], c) for c in row_chunks(count, self.chunk)]
        return {k: self.ops.concatenate([p[k] for p in pieces], axis=0) for k in pieces[0]}

    def logits(self, input_ids, attention_mask):
        return self.head(self._logits)

    def logits_and_scores(self, input_ids, attention_mask):
        return self.head(self._logits), self._scores

    def frozen_logits(self, role, input_ids, attention_mask):
        return self.head(self.frozen_hidden(role, input_ids, attention_mask), role)


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
    logprobs = head_terms(ops, forward, batch["input_ids"], batch["attention_mask"])["logprobs"]
    loss = -masked_mean(ops, logprobs, batch["loss_mask"])
    return loss, {"nll": loss}
