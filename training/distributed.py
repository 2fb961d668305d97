"""Running under `torchrun --nproc_per_node=N`: one process per device, DistributedDataParallel.

Without torchrun's environment variables everything here is a no-op for a single process, so
`train.py` is the same program either way. CPUs use the gloo backend, GPUs NCCL. Only rank 0
prepares data, prints and writes files; the others wait at a barrier where that matters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.device import pick_device


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The average of `value` over all processes."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world

    def any(self, flag: bool) -> bool:
        """True on every process if `flag` is true on any (so all ranks stop at the same step)."""
        if self.world == 1:
            return flag
        tensor = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() > 0

    def maximum(self, value: float) -> float:
        """The largest `value` of all processes: the time a step took on the slowest one, so that every
        rank sees the same progress through a time budget (its learning rate, its evaluations, its end)."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.item()

    def from_main(self, values: list) -> list:
        """Rank 0's `values` on every process (what rank 0 alone measured, so all size the same model)."""
        if self.world > 1:
            dist.broadcast_object_list(values, src=0)
        return values

    def seed_own_stream(self, seed: int, step: int) -> None:
        """Give each process but rank 0 its own torch random stream from here on (after the model's
        initialisation, which must match): with one seed everywhere every rank would draw the same
        dropout masks for its rows. Rank 0 keeps the single-process stream, so one process trains as
        it always did, and saves it in each checkpoint; the others reseed from `step` at every step, so
        a run resumed from any checkpoint draws the masks the whole run drew."""
        if self.rank:
            torch.manual_seed(hash((seed, self.rank, step)) & (2**63 - 1))

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup(requested_device: str) -> Distributed:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(device=pick_device(requested_device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(requested_device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, local_rank, world, device)
