"""mx.distributed for data-parallel runs started by mlx.launch (mlxpost/distributed.py)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlxpost.distributed import World, peer_lost


class MLXWorld(World):
    def __init__(self):
        self.group = mx.distributed.init(strict=True)
        self.rank, self.size = self.group.rank(), self.group.size()

    def all_sum(self, array) -> np.ndarray:
        return np.array(self.reduce(mx.array(np.asarray(array, np.float64))))

    def reduce(self, array: mx.array) -> mx.array:
        # Collectives run on the CPU stream (the ring and MPI backends have no GPU kernels).
        try:
            summed = mx.distributed.all_sum(array, group=self.group, stream=mx.cpu)
            mx.eval(summed)
        except RuntimeError as err:
            raise peer_lost(err) from err
        return summed

    def sum_gradients(self, grads):
        """The tree of gradients summed over the ranks, in one float32 all-reduce."""
        leaves = tree_flatten(grads)
        flat = mx.concatenate([g.reshape(-1).astype(mx.float32) for _, g in leaves])
        flat = self.reduce(flat)
        out, offset = [], 0
        for name, g in leaves:
            out.append((name, flat[offset : offset + g.size].reshape(g.shape).astype(g.dtype)))
            offset += g.size
        return tree_unflatten(out)


def join() -> MLXWorld:
    return MLXWorld()
