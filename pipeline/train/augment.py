"""Geometric augmentation: one random similarity (shift, scale, rotation, mirror) per sample, applied to the
image and mask with grid_sample and to the landmarks with the same matrix.

The draw for a sample depends only on (seed, epoch, sample index), so it does not change with the number
of DDP processes, the batch composition or a resume from a checkpoint.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..shards.tables import IBUG_FLIP
from .config import AugmentSettings


def sample_similarity(indices: torch.Tensor, epoch: int, seed: int, settings: AugmentSettings,
                      size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random similarities for the samples `indices` (B,) int: (matrices (B, 2, 3) float32 mapping source
    crop px to augmented crop px, flipped (B,) bool). Mirror first, then rotate and scale about the image
    centre, then shift."""
    centre = (size - 1) / 2.0
    mats, flips = [], []
    for index in indices.tolist():
        rng = np.random.default_rng([seed, epoch, index])
        u = rng.uniform(-1.0, 1.0, size=4)
        flip = bool(rng.uniform() < settings.flip)
        scale = 1.0 + settings.scale * u[0]
        angle = math.radians(settings.rotation_deg * u[1])
        shift = settings.shift_px * u[2:]
        mirror = np.array([[-1.0, 0.0, 2 * centre], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) if flip else np.eye(3)
        c, s = scale * math.cos(angle), scale * math.sin(angle)
        # p' = sR (p - centre) + centre + shift; image y points down, so positive angles turn clockwise on screen
        about_centre = np.array([[c, -s, centre - c * centre + s * centre + shift[0]],
                                 [s, c, centre - s * centre - c * centre + shift[1]], [0.0, 0.0, 1.0]])
        mats.append((about_centre @ mirror)[:2])
        flips.append(flip)
    return torch.tensor(np.stack(mats), dtype=torch.float32), torch.tensor(flips, dtype=torch.bool)


def warp(image: torch.Tensor, mask: torch.Tensor, lmk_px: torch.Tensor, matrices: torch.Tensor,
         flipped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply per-sample similarities. image (B, 3, S, S), mask (B, 1, S, S), lmk_px (B, 68, 2) crop px,
    matrices (B, 2, 3) source px -> target px, flipped (B,) bool -> the warped (image, mask, lmk_px);
    mirrored samples get their landmark labels swapped (IBUG_FLIP). Outside the source: 0."""
    b, _, size, _ = image.shape
    m = matrices.to(image)
    full = torch.cat([m, m.new_tensor([0.0, 0.0, 1.0]).expand(b, 1, 3)], dim=1)
    # grid_sample wants, for every output pixel, its source position in [-1, 1] (align_corners: -1 and 1
    # are the centres of the first and last pixel, matching pixel centres at integer px).
    to_norm = m.new_tensor([[2.0 / (size - 1), 0.0, -1.0], [0.0, 2.0 / (size - 1), -1.0], [0.0, 0.0, 1.0]])
    theta = (to_norm @ torch.linalg.inv(full) @ torch.linalg.inv(to_norm))[:, :2]
    grid = F.affine_grid(theta, [b, 1, size, size], align_corners=True)
    warped_image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    warped_mask = F.grid_sample(mask, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    lmk = lmk_px @ m[:, :, :2].transpose(1, 2) + m[:, None, :, 2]
    lmk = torch.where(flipped.to(lmk.device)[:, None, None], lmk[:, list(IBUG_FLIP)], lmk)
    return warped_image, warped_mask, lmk
