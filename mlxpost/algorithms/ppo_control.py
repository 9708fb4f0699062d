"""PPO's running state besides the weights: the KL coefficient and running moments.

- `KLController`: a fixed KL coefficient, or the adaptive one of Ziegler et al. (2019,
  "Fine-Tuning Language Models from Human Preferences", section 2.2), which moves the
  coefficient towards a target KL per sequence:

      e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n / horizon)

  with n the rollouts of the step. Ziegler et al. use horizon 10,000 over runs of
  hundreds of thousands of samples; runs of a few thousand samples need a shorter one.
- `RunningMoments`: mean and variance of every value seen so far (Chan et al.'s parallel
  update), to normalise reward-model scores and value targets across steps.

Both are numpy and saved with each checkpoint, so a resumed run continues from them.
"""

from __future__ import annotations

import numpy as np

from mlxpost import distributed


class KLController:
    def __init__(self, beta: float, target: float = 0.0, horizon: float = 500.0):
        self.value, self.target, self.horizon = float(beta), float(target), float(horizon)

    @property
    def adaptive(self) -> bool:
        return self.target > 0

    def update(self, kl: float, rollouts: int) -> None:
        """Ziegler et al.'s proportional step from the step's mean KL per sequence."""
        if not self.adaptive:
            return
        error = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + error * rollouts / self.horizon

    def state(self) -> dict:
        return {"value": self.value}

    def load_state(self, state: dict) -> None:
        self.value = float(state["value"])


class RunningMoments:
    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    @property
    def std(self) -> float:
        return float(np.sqrt(self.m2 / self.count)) if self.count else 1.0

    def update(self, values: np.ndarray) -> None:
        """Take in the values of every rank (mlxpost.distributed), so that all ranks keep
        the same moments."""
        world = distributed.world()
        values = np.asarray(values, np.float64).reshape(-1)
        total, count = world.all_sum([values.sum(), values.size])
        count = int(count)
        if count == 0:
            return
        mean = float(total) / count
        m2 = float(world.all_sum([np.square(values - mean).sum()])[0])
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.m2 += m2 + delta * delta * self.count * count / total
        self.count = total

    def normalise(self, values: np.ndarray, eps: float = 1e-8) -> np.ndarray:
        return (values - self.mean) / (self.std + eps)

    def denormalise(self, values: np.ndarray, eps: float = 1e-8) -> np.ndarray:
        return values * (self.std + eps) + self.mean

    def state(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), state["mean"], state["m2"]
