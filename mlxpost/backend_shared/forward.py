"""The framework-free part of both backends' Forward (mlxpost.backend.Forward): chunking the
language-model head over rows, the frozen roles, and the whole-logits conveniences. A backend
subclass supplies hidden, hidden_and_scores, frozen_hidden, head and scores, and how a chunk
is recomputed in the backward pass (checkpointed) and joined (concatenate)."""

from __future__ import annotations

import contextlib

from mlxpost.backend_shared.heads import model_chunk_rows, row_chunks


class SharedForward:
    def __init__(self, model):
        self.model = model  # MLXModel or TorchModel: .lora, .frozen, .config, .logits_chunk

    # ---- supplied by the backend ----
    def checkpointed(self, fn, rows, chain: dict):
        """fn(rows) with its intermediates recomputed in the backward pass. `chain` is one
        dict shared by the chunks of one map_head_rows call, in order (a backend may use it
        to run the chunks one after another)."""
        raise NotImplementedError

    def recomputes(self, rows) -> bool:
        """Whether a gradient may flow through rows (so chunks are worth recomputing)."""
        return True

    def head_rows(self, attention_mask):
        """(keep, put_back) index arrays of the predicting positions the loss head needs
        (backend_shared/unpad.py), or None for all of them."""
        return None

    @staticmethod
    def concatenate(arrays):
        raise NotImplementedError

    # ---- shared ----
    def map_head_rows(self, fn, rows, role=None):
        """fn(rows[chunk], chunk) -> {name: (n,) array} over chunks of rows (N, H), joined
        into {name: (N,)}. A chunk holds --logits-chunk rows (heads.logits_chunk_rows);
        through this model's head (role None) each chunk is checkpointed, so its logits are
        freed after the forward pass and recomputed, one chunk at a time, in the backward."""
        chunks = row_chunks(rows.shape[0], model_chunk_rows(self.model))
        if len(chunks) == 1:
            return fn(rows, chunks[0])
        recompute = role is None and self.recomputes(rows)
        names, pieces, chain = [], [], {}
        for chunk in chunks:

            def run(part, chunk=chunk):
                out = fn(part, chunk)
                names[:] = list(out)
                return [out[name] for name in names]

            part = rows[chunk]
            pieces.append(self.checkpointed(run, part, chain) if recompute else run(part))
        return {name: self.concatenate([p[i] for p in pieces]) for i, name in enumerate(names)}

    @contextlib.contextmanager
    def frozen_model(self, role):
        """The frozen model attached for `role`; a reference that was not attached is this
        model with its adapter switched off (inside a compiled MLX step the switches happen at
        trace time: the graph holds both passes)."""
        other = self.model.frozen.get(role)
        if other is not None:
            yield other
            return
        if role != "reference" or not self.model.lora:
            raise ValueError(f"no {role} model attached (and no adapter to switch off)")
        for layer in self.model.lora.values():
            layer.enabled = False
        try:
            yield self.model
        finally:
            for layer in self.model.lora.values():
                layer.enabled = True

    # The whole (B, T, V) logits, for losses that need them as they are.
    def logits(self, input_ids, attention_mask):
        return self.head(self.hidden(input_ids, attention_mask))

    def logits_and_scores(self, input_ids, attention_mask):
        hidden, scores = self.hidden_and_scores(input_ids, attention_mask)
        return self.head(hidden), scores

    def frozen_logits(self, role, input_ids, attention_mask):
        return self.head(self.frozen_hidden(role, input_ids, attention_mask), role)
