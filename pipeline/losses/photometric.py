"""Image-level term: robust colour distance between the render and the photo inside the face mask."""
from __future__ import annotations

import torch

from .shapes import check_shape


def photometric_loss(render: torch.Tensor, photo: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6
                     ) -> torch.Tensor:
    """Mask-weighted mean over pixels of the per-pixel colour distance sqrt(eps + sum_c (render - photo)^2).

    render, photo: (B, C, H, W) float, same range (e.g. [0, 1] RGB); mask: (B, 1, H, W) float weights >= 0
    (face mask x render coverage). Returns a scalar in the images' units: sum(distance * mask) over
    max(sum(mask), 1) across the whole batch, as Deep3DFaceRecon's photo_loss, so an empty mask gives 0.
    eps keeps the gradient finite where the images agree (there the distance is sqrt(eps)).
    """
    sizes: dict[str, int] = {}
    check_shape("render", render, ("B", "C", "H", "W"), sizes)
    check_shape("photo", photo, ("B", "C", "H", "W"), sizes)
    check_shape("mask", mask, ("B", 1, "H", "W"), sizes)
    distance = torch.sqrt(eps + ((render - photo) ** 2).sum(dim=1, keepdim=True))
    per_image = (distance * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp_min(1.0)
    return per_image.sum() / max(per_image.numel(), 1)
