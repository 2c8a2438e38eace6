"""The hybrid-level weak supervision objective of Deng et al. (2019): one weighted sum, shared by training
and per-image fitting."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import (coefficient_regularizer, identity_loss, landmark_loss, lighting_regularizer, photometric_loss,
               reflectance_loss)
from ..face_model import Coeffs
from ..nets.identity import IdentityFeatures, five_points_torch
from ..render.face import FaceRender


@dataclass(frozen=True)
class LossWeights:
    """Term weights; defaults are Deep3DFaceRecon_pytorch's. Two additions, off by default: `mesh` weighs the
    dense term on MediaPipe's 468 face-mesh points (same px^2 units as the 68-point term), and
    `landmark_delta_px` > 0 makes both landmark terms robust (pseudo-Huber, losses.landmarks.robust_squared)."""
    photometric: float = 1.92
    landmark: float = 1.6e-3
    identity: float = 0.2
    coefficient: float = 3.0e-4
    w_id: float = 1.0
    w_exp: float = 0.8
    w_alb: float = 1.7e-2
    lighting: float = 10.0
    reflectance: float = 5.0
    mesh: float = 0.0
    landmark_delta_px: float = 0.0

    def __post_init__(self):
        negative = {k: v for k, v in vars(self).items() if not v >= 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0, got {negative}")


def hybrid_loss(face: FaceRender, coeffs: Coeffs, photo: torch.Tensor, face_mask: torch.Tensor,
                lmk_px: torch.Tensor, lmk_weights: torch.Tensor, skin_weight: torch.Tensor, weights: LossWeights,
                identity_features: IdentityFeatures | None = None,
                mesh_pred_px: torch.Tensor | None = None, mesh_px: torch.Tensor | None = None,
                mesh_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its unweighted terms.

    face: render of `coeffs` at S x S; photo: (B, 3, S, S) in [0, 1]; face_mask: (B, 1, S, S) in [0, 1] (parsing
    or skin mask); lmk_px: (B, 68, 2) target landmarks in crop pixels; lmk_weights: (68,); skin_weight: (V,);
    identity_features: optional (images (B, 3, S, S), five points (B, 5, 2) px) -> (B, D) embeddings
    (nets.identity.load_identity_features: dlib's ResNet or ArcFace); the term is skipped when None.
    mesh_pred_px, mesh_px: (B, 468, 2) the model's face-mesh points (FaceDecoder.mesh468_px) and the detected
    mesh, crop px; mesh_weights: (468,); the "mesh" term is computed when weights.mesh > 0 and they are given.
    The photometric term compares pixels inside face_mask x render coverage only, as in the paper.
    """
    delta = weights.landmark_delta_px
    terms = {
        "photometric": photometric_loss(face.image, photo, face_mask * face.mask),
        "landmark": landmark_loss(face.decoded.lmk_px, lmk_px, lmk_weights, delta),
        "coefficient": coefficient_regularizer(coeffs.id, coeffs.exp, coeffs.alb, weights.w_id, weights.w_exp,
                                               weights.w_alb),
        "lighting": lighting_regularizer(coeffs.sh),
        "reflectance": reflectance_loss(face.decoded.albedo, skin_weight),
    }
    if weights.mesh > 0 and mesh_px is not None:
        terms["mesh"] = landmark_loss(mesh_pred_px, mesh_px, mesh_weights, delta)
    if identity_features is not None and weights.identity > 0:
        # Deep3DFaceRecon's choice: both chips cut by the similarity of the render's predicted five points
        target = IdentityTarget.of(identity_features, photo, five_points_torch(face.decoded.lmk_px))
        terms["identity"] = identity_loss(target.render_features(face, photo), target.photo_features)
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return total, terms


class IdentityTarget(NamedTuple):
    """The photo's side of the identity term: the recogniser, the five points (B, 5, 2) px whose similarity
    cuts both chips, and the photo's features (B, D), computed once (no gradient)."""
    features: IdentityFeatures
    five_px: torch.Tensor
    photo_features: torch.Tensor

    @classmethod
    def of(cls, features: IdentityFeatures, photo: torch.Tensor, five_px: torch.Tensor) -> "IdentityTarget":
        five_px = five_px.detach()
        with torch.no_grad():
            return cls(features, five_px, features(photo, five_px))

    def render_features(self, face: FaceRender, photo: torch.Tensor) -> torch.Tensor:
        """(B, D) features of the render, differentiable. The render is only defined on the face, so it is
        composited over the photo: both chips show the same pixels outside the face."""
        return self.features(face.image * face.mask + photo * (1 - face.mask), self.five_px)
