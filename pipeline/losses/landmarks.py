"""Geometric terms: weighted squared (or robust) distances between projected and detected landmarks, for the 68
iBUG points and for the 468 points of MediaPipe's face mesh."""
from __future__ import annotations

import torch

from .shapes import check_shape

N_LANDMARKS = 68
JAW_POINTS = slice(0, 17)     # 0-based iBUG points 0-16: the jaw contour
NOSE_POINTS = slice(28, 31)   # 0-based iBUG points 28-30: the nose bridge down to above the tip
INNER_MOUTH = slice(60, 68)   # 0-based iBUG points 60-67: the inner lip contour


def landmark_weights(nose_weight: float = 20.0, mouth_weight: float = 20.0, jaw_weight: float = 1.0) -> torch.Tensor:
    """Per-point landmark weights; the defaults are Deep3DFaceRecon's: 1 everywhere, `nose_weight` on points
    28-30, `mouth_weight` on the 8 inner-mouth points 60-67 and `jaw_weight` on the 17 jaw points 0-16 (0-based
    iBUG order). Returns (68,) float32 on the CPU, not normalised (the loss averages over points, not over
    weights)."""
    weights = torch.ones(N_LANDMARKS)
    weights[JAW_POINTS] = jaw_weight
    weights[NOSE_POINTS] = nose_weight
    weights[INNER_MOUTH] = mouth_weight
    return weights


def robust_squared(squared_px2: torch.Tensor, delta_px: float) -> torch.Tensor:
    """Pseudo-Huber of squared distances: 2 delta^2 (sqrt(1 + d^2 / delta^2) - 1), px^2. Equal to d^2 for
    d << delta and growing as 2 delta d beyond, so a few wrong points (an occluded or mislabelled one) pull with
    a bounded force; delta_px = 0 returns d^2 unchanged (plain least squares)."""
    if delta_px <= 0:
        return squared_px2
    return 2 * delta_px ** 2 * (torch.sqrt(1 + squared_px2 / delta_px ** 2) - 1)


def landmark_loss(lmk_pred_px: torch.Tensor, lmk_gt_px: torch.Tensor, weights: torch.Tensor,
                  delta_px: float = 0.0) -> torch.Tensor:
    """Mean over images and points of weight x squared (robust_squared, delta_px > 0) distance.

    lmk_pred_px, lmk_gt_px: (B, N, 2) float pixels; weights: (N,) float. Returns a scalar in px^2:
    sum_b,n w_n rho(|pred - gt|^2) / (B N) (rho = identity for delta_px = 0: Deep3DFaceRecon's landmark_loss);
    0 when B N = 0.
    """
    sizes: dict[str, int] = {}
    check_shape("lmk_pred_px", lmk_pred_px, ("B", "N", 2), sizes)
    check_shape("lmk_gt_px", lmk_gt_px, ("B", "N", 2), sizes)
    check_shape("weights", weights, ("N",), sizes)
    squared = robust_squared(((lmk_pred_px - lmk_gt_px) ** 2).sum(dim=-1), delta_px)
    return (squared * weights).sum() / max(squared.numel(), 1)
