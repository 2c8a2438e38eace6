"""The training objective: Deng et al.'s hybrid loss as a per-sample mean, plus the prior of a trainable
face model."""
from __future__ import annotations

from typing import Callable

import torch

from ..face_model import Coeffs, Decoded, FaceDecoder
from ..losses.hybrid import LossWeights, hybrid_loss
from ..render.face import FaceRender


def per_sample_hybrid_loss(face: FaceRender, coeffs: Coeffs, photo: torch.Tensor, face_mask: torch.Tensor,
                           lmk_px: torch.Tensor, lmk_weights: torch.Tensor, skin_weight: torch.Tensor,
                           weights: LossWeights, identity_features: Callable | None = None,
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """hybrid_loss (same arguments, batch of B) as the mean over samples of each sample's own loss; the terms
    {name: scalar} likewise.

    hybrid_loss's photometric term divides by the mask area of the whole batch (Deep3DFaceRecon's photo_loss),
    so a face's weight would depend on its batch mates, and N DDP processes with B/N faces each would not
    take the step of one process with all B. Evaluated face by face (the render stays batched), the loss is
    a per-sample mean and DDP's gradient average equals the gradient of the whole batch.
    """
    rows = []
    for i in range(photo.shape[0]):
        one = slice(i, i + 1)
        face_i = FaceRender(Decoded(*(t[one] for t in face.decoded)), *(t[one] for t in face[1:]))
        rows.append(hybrid_loss(face_i, Coeffs(*(t[one] for t in coeffs)), photo[one], face_mask[one], lmk_px[one],
                                lmk_weights, skin_weight, weights, identity_features))
    total = torch.stack([total for total, _ in rows]).mean()
    terms = {name: torch.stack([t[name] for _, t in rows]).mean() for name in rows[0][1]}
    return total, terms


def face_model_prior(decoder: FaceDecoder, start: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the trained face model arrays {name: start value} of the mean squared change from the start."""
    return sum(((getattr(decoder, name) - value) ** 2).mean() for name, value in start.items())
