"""Data order and seeding: which samples each process sees at each step, reproducible and resumable.

The order of an epoch is DistributedSampler's permutation for (seed, epoch), dealt round-robin to the
processes, so a step's global batch is the same set of samples for any number of processes that divides the
batch. The training step number alone fixes the position in the data (epoch, batch within it).
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and python follow it
    seed_everything(torch.initial_seed() % 2**32)


class Indexed(Dataset):
    """A face dataset whose items also carry their dataset index (the augmentation draws from it)."""

    def __init__(self, faces: Dataset):
        self.faces = faces

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, index: int) -> dict:
        return {**self.faces[index], "index": index}


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack the fields training reads: image (B, 3, S, S), mask (B, 1, S, S), lmk_px (B, 68, 2), index (B,)."""
    out = {k: torch.stack([torch.as_tensor(it[k], dtype=torch.float32) for it in items])
           for k in ("image", "mask", "lmk_px")}
    out["index"] = torch.tensor([it["index"] for it in items], dtype=torch.int64)
    return out


def steps_per_epoch(n_samples: int, batch_size: int, world_size: int) -> int:
    """Optimiser steps in one epoch: the per-process share (padded as DistributedSampler pads) over the
    per-process batch, the last batch possibly short."""
    per_process = -(-n_samples // world_size)
    local_batch = batch_size // world_size
    return -(-per_process // local_batch)


def epoch_loader(faces: Dataset, epoch: int, first_batch: int, batch_size: int, seed: int, rank: int,
                 world_size: int, workers: int) -> DataLoader:
    """The batches of this process for `epoch`, starting at batch `first_batch` (for a resume mid-epoch)."""
    sampler = DistributedSampler(faces, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    local_batch = batch_size // world_size
    order = list(sampler)[first_batch * local_batch:]
    return DataLoader(Indexed(faces), batch_size=local_batch, sampler=order, collate_fn=collate,
                      num_workers=workers, worker_init_fn=_seed_worker,
                      generator=torch.Generator().manual_seed(seed * 100_003 + epoch * 1009 + rank))
