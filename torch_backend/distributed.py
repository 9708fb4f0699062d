"""torch.distributed for data-parallel runs started by torchrun (mlxpost/distributed.py)."""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from mlxpost.distributed import World, peer_lost

# Rank 0 evaluates and writes checkpoints while the others wait in the next step's
# all-reduce: long held-out evaluations must not time the group out.
TIMEOUT = timedelta(hours=4)


class TorchWorld(World):
    def __init__(self):
        cuda = torch.cuda.is_available()
        if cuda:  # one GPU per local rank; the backend's "cuda" device is the current one
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda") if cuda else torch.device("cpu")

    def all_sum(self, array) -> np.ndarray:
        tensor = torch.as_tensor(np.asarray(array, np.float64)).to(self.device)
        self.all_reduce(tensor)
        return tensor.cpu().numpy()

    def all_reduce(self, tensor: torch.Tensor) -> None:
        try:
            dist.all_reduce(tensor)
        except (RuntimeError, dist.DistBackendError) as err:
            raise peer_lost(err) from err

    def sum_gradients(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum each gradient over the ranks in place, in one float32 all-reduce."""
        if not grads:
            return grads
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        self.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return grads


def join() -> TorchWorld:
    return TorchWorld()
