"""Training throughput: images/s of whole training steps (augmentation, R-Net forward and backward, render,
hybrid loss, Adam) at a given config."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..face_model import CoeffLayout, FaceModel
from ..nets import build_rnet
from ..train import Dist, TrainConfig, Trainer
from ..train.data import Indexed, collate
from .timing import median_seconds


def train_images_per_second(cfg: TrainConfig, face_model: FaceModel, faces: Dataset,
                            device: torch.device | str = "cpu", steps: int = 3, warmup: int = 1) -> float:
    """Training images/s of one process on `device`: cfg.batch_size over the median time of `steps` training
    steps (after `warmup` untimed ones) on one batch of faces cycled from `faces` (items as the shards').
    The network is a fresh cfg.arch."""
    world = Dist(rank=0, world_size=1, device=torch.device(device))
    net = build_rnet(cfg.arch, CoeffLayout.of(face_model).size, cfg.init_weights or None)
    indexed = Indexed(faces)
    batch = collate([indexed[i % len(faces)] for i in range(cfg.batch_size)])
    trainer = Trainer(cfg, net, face_model, int(batch["image"].shape[-1]), world, steps_per_epoch=1)

    def one_step() -> None:
        trainer.step(batch, epoch=0)
        if world.device.type == "cuda":
            torch.cuda.synchronize(world.device)

    return cfg.batch_size / median_seconds(one_step, repeats=steps, warmup=warmup)
