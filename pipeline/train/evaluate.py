"""Validation metrics and the preview grid of a regressor over un-augmented faces."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..face_model import FaceDecoder
from ..render.face import FaceRender, render_face
from .data import Indexed, collate


def face_errors(batch: dict[str, torch.Tensor], face: FaceRender) -> tuple[torch.Tensor, torch.Tensor]:
    """Per face (B,): the mean landmark distance (px) between prediction and target, and the mean colour
    distance ||render - photo||_2 (RGB in [0, 1]) over the pixels inside both the face mask and the render
    (Deng et al.'s photometric error, unweighted)."""
    lmk_px = (face.decoded.lmk_px - batch["lmk_px"]).norm(dim=-1).mean(dim=1)
    weight = batch["mask"] * face.mask
    dist = (face.image - batch["image"]).norm(dim=1, keepdim=True)
    photo = (dist * weight).sum(dim=(1, 2, 3)) / weight.sum(dim=(1, 2, 3)).clamp_min(1.0)
    return lmk_px, photo


@torch.no_grad()
def evaluate(net: torch.nn.Module, decoder: FaceDecoder, faces: Dataset, device: torch.device, batch_size: int,
             ) -> tuple[dict[str, float], np.ndarray]:
    """Run `net` in eval mode over all faces: ({landmark_px, photometric}: means over faces, the preview grid
    of the first batch)."""
    was_training = net.training
    net.eval()
    lmk, photo, grid = [], [], None
    for batch in DataLoader(Indexed(faces), batch_size=batch_size, collate_fn=collate):
        batch = {k: v.to(device) for k, v in batch.items()}
        face = render_face(decoder, net(batch["image"]).float())
        errors = face_errors(batch, face)
        lmk.append(errors[0])
        photo.append(errors[1])
        if grid is None:
            grid = preview_grid(batch, face)
    net.train(was_training)
    return {"landmark_px": float(torch.cat(lmk).mean()), "photometric": float(torch.cat(photo).mean())}, grid


@torch.no_grad()
def recompute_batchnorm(net: torch.nn.Module, faces: Dataset, device: torch.device, batch_size: int) -> None:
    """Set every BatchNorm's running statistics to their average over `faces` (un-augmented), in place.

    During training they are running averages over augmented batches of a few faces, which jitter from step
    to step and move the evaluation-mode predictions even when the weights barely change ("precise BN").
    Faces with non-finite pixels (those training skipped) are left out."""
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None: a cumulative average over the batches below
    was_training = net.training
    net.train()
    for batch in DataLoader(Indexed(faces), batch_size=batch_size, collate_fn=collate):
        image = batch["image"].to(device)
        usable = torch.isfinite(image).flatten(1).all(dim=1)
        if usable.any():
            net(image[usable])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    net.train(was_training)


def _to_u8(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) float in [0, 1] (NaN -> 0) -> contiguous uint8."""
    return np.ascontiguousarray((np.clip(np.nan_to_num(rgb), 0.0, 1.0) * 255).round().astype(np.uint8))


def preview_grid(batch: dict[str, torch.Tensor], face: FaceRender, rows: int = 4) -> np.ndarray:
    """(rows x S, 3 x S, 3) uint8 RGB, one face per row: input | render over the input | target (green) and
    predicted (red) landmarks."""
    out = []
    for i in range(min(rows, batch["image"].shape[0])):
        photo = batch["image"][i].permute(1, 2, 0).cpu().numpy()
        cover = face.mask[i, 0, :, :, None].cpu().numpy()
        overlay = face.image[i].permute(1, 2, 0).cpu().numpy() * cover + photo * (1 - cover)
        marks = _to_u8(photo)
        for pts, colour in ((batch["lmk_px"][i], (0, 255, 0)), (face.decoded.lmk_px[i], (255, 0, 0))):
            for x, y in pts.cpu().numpy():
                if np.isfinite(x) and np.isfinite(y):  # a diverged prediction still gets its preview
                    cv2.circle(marks, (int(round(float(x))), int(round(float(y)))), 2, colour, -1, cv2.LINE_AA)
        out.append(np.concatenate([_to_u8(photo), _to_u8(overlay), marks], axis=1))
    return np.concatenate(out, axis=0)


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image (H, W, 3) as PNG."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
