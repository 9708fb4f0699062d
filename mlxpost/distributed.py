"""Data-parallel training on the engines' own launchers and collectives.

`torchrun` starts one process per rank for the torch backend (gloo on CPU,
nccl on CUDA); `mlx.launch` does the same for the MLX backend (mx.distributed).
Every rank holds the whole model and optimizer state, takes its share of each
step's global batch (`shard`), and the backends all-reduce the gradients so
that each rank applies the update the single-process run would have applied
to the same global batch (mlxpost/backend_shared/training.py, `global_weights`).
With --fsdp (torch, full fine-tuning) each rank holds only its share of the
weights, gradients and optimizer moments instead (torch_backend/fsdp.py).
Batch statistics an objective needs (batch-std advantages, token-count
normalisers, PPO whitening) are all-reduced by the algorithms through
`world().all_sum`; the step's metrics through `reduce_metrics`.

Rank 0 alone writes the run directory, the progress bar and the trackers;
a checkpoint holds the replicated state, so any number of ranks resumes it.

A process belongs to one group for its lifetime, so the world is process-wide:
`init(backend)` joins it once the backend is chosen, `world()` returns it (one
rank, collectives that return their input, until then or without a launcher).
"""

from __future__ import annotations

import importlib
import json
import os
import signal

import numpy as np

from mlxpost.errors import MlxpostError, UserError

WORLD_MODULES = {"torch": "torch_backend.distributed", "mlx": "mlxpost.mlx_backend.distributed"}
LAUNCHER_OF = {"torch": "torchrun", "mlx": "mlx.launch"}


class PeerLost(MlxpostError):
    """Another rank ended (crashed, killed, or the launcher stopped the run): exit status 1."""


class World:
    """One rank of `size`; this base class is the single-process world."""

    rank: int = 0
    size: int = 1
    # The model's weights are split over the ranks (--fsdp): every rank takes part in every
    # pass over it (evaluations and checkpoints included), not rank 0 alone.
    sharded: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, array) -> np.ndarray:
        """The element-wise sum of `array` over the ranks, as float64."""
        return np.asarray(array, np.float64)

    def sum_gradients(self, grads):
        """The backend's gradients (MLX: a tree of arrays; torch: a list of tensors, summed in
        place) summed over the ranks, in one all-reduce."""
        return grads

    def all_gather(self, value) -> list:
        """Every rank's JSON-serialisable `value`, in rank order."""
        if self.size == 1:
            return [value]
        data = np.frombuffer(json.dumps(value).encode(), np.uint8)
        lengths = np.zeros(self.size)
        lengths[self.rank] = len(data)
        lengths = self.all_sum(lengths).astype(int)
        # Bytes are small integers: a sum of slots that only one rank fills is exact.
        slots = np.zeros((self.size, int(lengths.max())))
        slots[self.rank, : len(data)] = data
        slots = self.all_sum(slots).astype(np.uint8)
        return [json.loads(bytes(row[:n])) for row, n in zip(slots, lengths)]

    def broadcast(self, array) -> np.ndarray:
        """Rank 0's `array` on every rank (the others pass one of the same shape)."""
        array = np.asarray(array, np.float64)
        return self.all_sum(array if self.is_main else np.zeros_like(array))


_world = World()


def world() -> World:
    return _world


def launcher() -> str | None:
    """The backend whose launcher started this process as one of several ranks: "torch"
    (torchrun), "mlx" (mlx.launch: ring's hosts file, nccl's world size or jaccl's
    coordinator); None otherwise."""
    mlx_group = ("MLX_HOSTFILE", "MLX_WORLD_SIZE", "MLX_JACCL_COORDINATOR")
    if "MLX_RANK" in os.environ and any(os.environ.get(name) for name in mlx_group):
        return "mlx"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        return "torch"
    return None


def launched_rank() -> int:
    """This process's rank as its launcher set it; known before any framework is imported."""
    which = launcher()
    if which == "mlx":
        return int(os.environ["MLX_RANK"])
    if which == "torch":
        return int(os.environ["RANK"])
    return 0


def is_main_process() -> bool:
    return launched_rank() == 0


def init(backend: str) -> World:
    """Join the launcher's process group for `backend` ("torch" or "mlx"); without a
    launcher, the single-process world."""
    global _world
    which = launcher()
    if which is None or _world.size > 1:
        return _world
    if which != backend:
        raise UserError(
            f"--backend {backend}: this process was started by {LAUNCHER_OF[which]}, which "
            f"launches the {which} backend; start {backend} runs with {LAUNCHER_OF[backend]}"
        )
    _world = importlib.import_module(WORLD_MODULES[backend]).join()
    # The launchers stop the other ranks with SIGTERM when one fails: end with one clear line.
    signal.signal(signal.SIGTERM, stopped_by_launcher)
    return _world


def stopped_by_launcher(signum, frame):
    raise PeerLost(f"rank {_world.rank}: stopped by the launcher (another rank ended)")


def peer_lost(err: BaseException) -> PeerLost:
    """The error a failed collective raises: a rank ended, or the network between them did."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return PeerLost(
        f"rank {_world.rank}: lost contact with the other ranks ({type(err).__name__}: {first[:200]})"
    )


def shard(indices: np.ndarray, world: World | None = None) -> np.ndarray:
    """This rank's share of a step's global `indices`: consecutive, sizes differing by at
    most one, rank 0's first (so one rank sees the whole batch in the same order)."""
    world = world or _world
    if world.size == 1:
        return indices
    if len(indices) < world.size:
        raise UserError(
            f"--batch-size {len(indices)} is smaller than the {world.size} ranks: each rank "
            "needs at least one example (prompt) of the global batch"
        )
    return np.array_split(np.asarray(indices), world.size)[world.rank]


def computed_in_shares(count: int, compute) -> np.ndarray:
    """(count,) values of `compute(indices) -> (len(indices),)` over range(count), each rank
    computing a share and every rank getting all of them (e.g. precomputed reference
    logprobs of a whole dataset)."""
    world = _world
    if world.size == 1:
        return np.asarray(compute(np.arange(count)))
    out = np.zeros(count)
    mine = np.array_split(np.arange(count), world.size)[world.rank]
    if len(mine):
        out[mine] = compute(mine)
    return world.all_sum(out)


def rank_seed(seed: int, world: World | None = None) -> int:
    """A sampling seed of its own for each rank; rank 0 keeps `seed`, so a one-rank run
    samples what a run without a launcher does."""
    world = world or _world
    return seed + world.rank * 1_000_000_007


def mean_and_std(values: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float, int]:
    """(mean, population std, count) of `values` (where `mask` > 0) over every rank's;
    two passes, as numpy's std."""
    picked = np.asarray(values, np.float64)
    if mask is not None:
        picked = picked[np.asarray(mask) > 0]
    count, total = _world.all_sum([picked.size, picked.sum()])
    mean = total / max(count, 1.0)
    squares = _world.all_sum([np.square(picked - mean).sum()])[0]
    return float(mean), float(np.sqrt(squares / max(count, 1.0))), int(count)


# Metrics that add up over the ranks (counts); the rest are means of equal shares of the batch.
SUMMED_METRICS = ("tokens", "reward_errors/")


def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A step's metrics over every rank: sums for SUMMED_METRICS, means of the ranks that
    report a figure for the others (the backends' loss and gradient figures are the same
    on every rank already)."""
    if _world.size == 1:
        return metrics
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    gathered = _world.all_gather(numbers)
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for rank in gathered for k in rank):
        values = [rank[key] for rank in gathered if key in rank and rank[key] is not None]
        if not values:
            out[key] = float("nan")
        elif key.startswith(SUMMED_METRICS):
            out[key] = float(np.sum(values))
        else:
            out[key] = float(np.mean(values))
    return out
