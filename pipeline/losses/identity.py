"""Perceptual term: agreement of face-recognition embeddings of the render and the photo."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .shapes import check_shape


def identity_loss(feat_a: torch.Tensor, feat_b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 - cosine similarity.

    feat_a, feat_b: (B, D) float embeddings (e.g. ArcFace, unit length; others are normalised here).
    Returns a scalar in [0, 2]; 0 for B = 0. Zero vectors count as similarity 0.
    """
    sizes: dict[str, int] = {}
    check_shape("feat_a", feat_a, ("B", "D"), sizes)
    check_shape("feat_b", feat_b, ("B", "D"), sizes)
    cosine = (F.normalize(feat_a, dim=1) * F.normalize(feat_b, dim=1)).sum(dim=1)
    return (1.0 - cosine).sum() / max(cosine.numel(), 1)
