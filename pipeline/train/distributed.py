"""torch.distributed set-up: torchrun's environment -> (rank, world size, device); none -> one process.

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set) every process joins one group: NCCL on
CUDA (one GPU per process, by LOCAL_RANK), gloo on CPU. Without it there is no group and the same code
runs as world size 1.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group if there is one. device: 'auto' (CUDA when available) | 'cpu' | 'cuda'."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def all_mean(values: torch.Tensor, world: Dist) -> torch.Tensor:
    """The mean of `values` over processes (identity for one process)."""
    if world.world_size == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world.world_size


def all_true(flag: bool, world: Dist, device: torch.device) -> bool:
    """True only if `flag` is true in every process (all of them then take the same branch)."""
    if world.world_size == 1:
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def barrier(world: Dist) -> None:
    if world.world_size > 1:
        dist.barrier()


def shutdown(world: Dist) -> None:
    if world.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
