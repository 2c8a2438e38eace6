"""Sparse geometric term: weighted squared distances between projected and detected landmarks."""
from __future__ import annotations

import torch

from .shapes import check_shape

N_LANDMARKS = 68
NOSE_POINTS = slice(28, 31)   # 0-based iBUG points 28-30: the nose bridge down to above the tip
INNER_MOUTH = slice(60, 68)   # 0-based iBUG points 60-67: the inner lip contour


def landmark_weights(nose_weight: float = 20.0, mouth_weight: float = 20.0) -> torch.Tensor:
    """Per-point weights of Deep3DFaceRecon's landmark loss: 1 everywhere, `nose_weight` on points 28-30 and
    `mouth_weight` on the 8 inner-mouth points 60-67 (0-based iBUG order). Returns (68,) float32 on the CPU,
    not normalised (the loss averages over points, not over weights)."""
    weights = torch.ones(N_LANDMARKS)
    weights[NOSE_POINTS] = nose_weight
    weights[INNER_MOUTH] = mouth_weight
    return weights


def landmark_loss(lmk_pred_px: torch.Tensor, lmk_gt_px: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over images and points of weight x squared distance.

    lmk_pred_px, lmk_gt_px: (B, N, 2) float pixels; weights: (N,) float. Returns a scalar in px^2:
    sum_b,n w_n |pred - gt|^2 / (B N), as Deep3DFaceRecon's landmark_loss; 0 when B N = 0.
    """
    sizes: dict[str, int] = {}
    check_shape("lmk_pred_px", lmk_pred_px, ("B", "N", 2), sizes)
    check_shape("lmk_gt_px", lmk_gt_px, ("B", "N", 2), sizes)
    check_shape("weights", weights, ("N",), sizes)
    squared = ((lmk_pred_px - lmk_gt_px) ** 2).sum(dim=-1)
    return (squared * weights).sum() / max(squared.numel(), 1)
