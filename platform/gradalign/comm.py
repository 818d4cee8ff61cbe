"""The one seam between the algorithms and distribution: summing a tensor across processes.

Algorithms hold the clients of their own process and express every mean over all clients as a local sum followed
by `comm.sum_`. With `LocalComm` one process holds every client; with `TorchDistributedComm` each process of a
`torch.distributed` group (gloo on CPU, nccl on GPU, e.g. the workers of a Ray TorchTrainer) holds a block.
"""

from __future__ import annotations

import numpy as np
import torch


class LocalComm:
    """A single process that holds every client."""

    rank = 0
    world_size = 1

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def local_clients(self, num_clients: int) -> list[int]:
        return list(range(num_clients))


class TorchDistributedComm(LocalComm):
    """Sums over the processes of the default (or given) `torch.distributed` process group."""

    def __init__(self, group=None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchDistributedComm needs an initialised torch.distributed process group")
        self._dist = dist
        self._group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM, group=self._group)
        return tensor

    def local_clients(self, num_clients: int) -> list[int]:
        return block_of(num_clients, self.world_size, self.rank)


def block_of(num_clients: int, world_size: int, rank: int) -> list[int]:
    """Client ids held by `rank`: contiguous, near-equal blocks (a process may hold none)."""
    return [int(i) for i in np.array_split(np.arange(num_clients), world_size)[rank]]
