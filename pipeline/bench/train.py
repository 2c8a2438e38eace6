"""Training throughput: images/s of whole training steps (augmentation, R-Net forward and backward, render,
hybrid loss, Adam) at a given config, timed after warm-up steps."""
from __future__ import annotations

import time

import torch
from torch.utils.data import Dataset

from ..face_model import CoeffLayout, FaceModel
from ..nets import build_rnet
from ..train import Dist, TrainConfig, Trainer
from ..train.data import Indexed, collate


def train_images_per_second(cfg: TrainConfig, face_model: FaceModel, faces: Dataset,
                            device: torch.device | str = "cpu", steps: int = 3, warmup: int = 1) -> float:
    """Training images/s of one process on `device`: `steps` timed steps of cfg.batch_size faces (cycled
    from `faces`, items as the shards') after `warmup` untimed ones. The network is a fresh cfg.arch."""
    world = Dist(rank=0, world_size=1, device=torch.device(device))
    net = build_rnet(cfg.arch, CoeffLayout.of(face_model).size, cfg.init_weights or None)
    indexed = Indexed(faces)
    batch = collate([indexed[i % len(faces)] for i in range(cfg.batch_size)])
    trainer = Trainer(cfg, net, face_model, int(batch["image"].shape[-1]), world, steps_per_epoch=1)
    for _ in range(warmup):
        trainer.step(batch, epoch=0)
    if world.device.type == "cuda":
        torch.cuda.synchronize(world.device)
    start = time.perf_counter()
    for epoch in range(steps):
        trainer.step(batch, epoch=epoch)
    if world.device.type == "cuda":
        torch.cuda.synchronize(world.device)
    return steps * cfg.batch_size / (time.perf_counter() - start)
