"""Perceptual term: agreement of face-recognition embeddings of the render and the photo."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .shapes import check_shape


def identity_distance(feat_a: torch.Tensor, feat_b: torch.Tensor) -> torch.Tensor:
    """Per face 1 - cosine similarity: (B,) in [0, 2].

    feat_a, feat_b: (B, D) float embeddings (ArcFace's are unit length, dlib's are not: all are normalised
    here). Zero vectors count as similarity 0.
    """
    sizes: dict[str, int] = {}
    check_shape("feat_a", feat_a, ("B", "D"), sizes)
    check_shape("feat_b", feat_b, ("B", "D"), sizes)
    return 1.0 - (F.normalize(feat_a, dim=1) * F.normalize(feat_b, dim=1)).sum(dim=1)


def identity_loss(feat_a: torch.Tensor, feat_b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of identity_distance: a scalar in [0, 2]; 0 for B = 0."""
    distance = identity_distance(feat_a, feat_b)
    return distance.sum() / max(distance.numel(), 1)
