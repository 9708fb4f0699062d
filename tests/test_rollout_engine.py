"""The rollout engine seam: GRPO samples through whatever engine its Rollouts hold."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from mlxpost.algorithms.grpo import GRPO, GRPOConfig
from mlxpost.algorithms.rollouts import BackendEngine
from mlxpost.loop import setup


class CountingEngine:
    """Another engine: here the backend's sampler, counting what the algorithm asks of it."""

    def __init__(self, inner):
        self.inner, self.synced, self.sampled = inner, 0, 0

    def sync_weights(self) -> None:
        self.synced += 1

    def sample(self, prompts, cfg, eos_ids, pad_id, seed):
        self.sampled += 1
        return self.inner.sample(prompts, cfg, eos_ids, pad_id, seed)


def test_grpo_samples_through_the_engine_it_is_given(tmp_path):
    cfg = GRPOConfig(
        backend="torch",
        steps=1,
        batch_size=2,
        num_generations=2,
        max_new_tokens=6,
        eval_math=0,
        log_kl=False,
        output=str(tmp_path / "run"),
    )
    session = setup("grpo", cfg)
    algorithm = GRPO(session, cfg)
    engine = CountingEngine(BackendEngine(session))
    algorithm.rollouts.engine = engine
    metrics = algorithm.train_step(0)
    assert (engine.synced, engine.sampled) == (1, 1)
    assert "reward" in metrics and metrics["logprob_gap"] < 1e-4
