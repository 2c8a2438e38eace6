"""Per-image analysis-by-synthesis: optimise coefficients of many faces at once with the training losses.

Coarse to fine, as classic 3DMM fitting: first pose, translation, identity and expression against the
landmarks alone (no rendering, cheap), then every group against the full hybrid loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..face_model import Coeffs, Decoded, FaceDecoder
from ..losses import landmark_loss
from ..losses.hybrid import LossWeights, hybrid_loss
from ..render.face import FaceRender, render_face

LANDMARK_STAGE_GROUPS = ("id", "exp", "rot", "trans")


def fitting_weights() -> LossWeights:
    """Deep3DFaceRecon's weights without the landmark term in the full stage, measured on synthetic benchmarks
    (yaw up to 60 deg, rigid-aligned mean vertex error, 200 full steps; seed 1, 25 faces, mean face 6.49 mm):
    dlib's points place the face in the landmark stage, but they disagree with the model's landmark vertices
    by ~8% NME even on the model's own renders, so refining shape against them pulls it off (landmark 1.6e-3:
    7.16 mm, 1e-4: 5.10 mm, 0: 3.65 mm). The coefficient prior stays Deep3DFaceRecon's 3e-4 (1e-3: 4.03 mm,
    3e-3: 4.51 mm at 100 steps, where 3e-4 gave 3.95 mm). Measured with the albedo model of the time: each
    change of the fit rebuilds the albedo model and so the synthetic faces, which moves these numbers."""
    return LossWeights(landmark=0.0)


@dataclass(frozen=True)
class FitSettings:
    landmark_steps: int = 100
    # 200 full steps: 3.65 mm against 3.95 mm at 100 on the seed-1 synthetic benchmark (cosine lr decay: 3.89)
    full_steps: int = 200
    # Adam moves each coefficient by about lr per step: identity coefficients are ~N(0, 1), so lr = 0.01
    # could not reach them in a hundred steps (measured: 4.0 mm vs 2.3 mm rigid-aligned error at lr = 0.05).
    lr: float = 5.0e-2
    weights: LossWeights = field(default_factory=fitting_weights)
    # The landmark stage has its own landmark weight (Deep3DFaceRecon's) and prior: without the prior identity
    # absorbs landmark noise (1e-3: 4.98 mm, 1e-2: 3.65 mm, 3e-2: 4.22 mm on the seed-1 benchmark).
    landmark_stage_weight: float = 1.6e-3
    landmark_stage_coefficient: float = 1.0e-2

    @classmethod
    def from_params(cls, section: dict) -> "FitSettings":
        """From the plain `reconstruct` parameter section (landmark_steps, full_steps, lr, loss_weights,
        landmark_stage_weight, landmark_stage_coefficient)."""
        return cls(landmark_steps=section["landmark_steps"], full_steps=section["full_steps"], lr=section["lr"],
                   weights=LossWeights(**section["loss_weights"]),
                   landmark_stage_weight=section["landmark_stage_weight"],
                   landmark_stage_coefficient=section["landmark_stage_coefficient"])


def _check_batch(photo: torch.Tensor, face_mask: torch.Tensor, lmk_px: torch.Tensor, size: int) -> None:
    b = photo.shape[0]
    if photo.shape != (b, 3, size, size):
        raise ValueError(f"photo: expected (B, 3, {size}, {size}), got {tuple(photo.shape)}")
    if face_mask.shape != (b, 1, size, size):
        raise ValueError(f"face_mask: expected ({b}, 1, {size}, {size}), got {tuple(face_mask.shape)}")
    if lmk_px.shape != (b, 68, 2):
        raise ValueError(f"lmk_px: expected ({b}, 68, 2), got {tuple(lmk_px.shape)}")


def _group_mask(decoder: FaceDecoder, groups: tuple[str, ...], like: torch.Tensor) -> torch.Tensor:
    """(1, C) 1.0 on the coefficient entries of `groups`, 0.0 elsewhere."""
    parts = [torch.full((1, k), float(name in groups), device=like.device, dtype=like.dtype)
             for name, k in decoder.layout.sizes.items()]
    return torch.cat(parts, dim=1)


def fit_coefficients(decoder: FaceDecoder, photo: torch.Tensor, face_mask: torch.Tensor, lmk_px: torch.Tensor,
                     lmk_weights: torch.Tensor, settings: FitSettings, init: torch.Tensor | None = None,
                     ) -> torch.Tensor:
    """Fit B faces jointly (one tensor, one optimiser; the loss is a per-face sum so faces stay independent).

    photo: (B, 3, S, S) crops in [0, 1]; face_mask: (B, 1, S, S) in [0, 1]; lmk_px: (B, 68, 2) crop pixels;
    lmk_weights: (68,); init: (B, C) start coefficients (default: the mean face, frontal).
    Returns coefficients (B, C), detached.
    """
    size = decoder.camera.size_px
    _check_batch(photo, face_mask, lmk_px, size)
    b = photo.shape[0]
    coeffs = decoder.layout.zeros(b, photo.device, photo.dtype) if init is None else init.detach().clone()
    w = settings.weights
    if settings.landmark_steps > 0:
        coeffs = fit_to_landmarks(decoder, coeffs, lmk_px, lmk_weights, settings.landmark_steps, settings.lr,
                                  settings.landmark_stage_weight, settings.landmark_stage_coefficient)
    coeffs.requires_grad_(True)

    # A gradient spike (a pixel on a nearly edge-on triangle: barycentric derivatives grow as 1 / area) fills
    # Adam's momentum, which can then walk a face off for tens of steps (seen on the annotated photo: a face at
    # 25 deg yaw turned to 57 deg, its loss x2.6, landmarks 100 px off). Each face keeps its lowest-loss iterate.
    opt = torch.optim.Adam([coeffs], lr=settings.lr)
    best, best_loss = coeffs.detach().clone(), torch.full((b,), float("inf"), device=coeffs.device, dtype=coeffs.dtype)
    for step in range(settings.full_steps + 1):
        face = render_face(decoder, coeffs)
        loss = face_totals(per_face_terms(decoder, face, coeffs, photo, face_mask, lmk_px, lmk_weights, w), w)
        with torch.no_grad():
            improved = loss < best_loss
            best[improved], best_loss[improved] = coeffs[improved], loss[improved]
        if step == settings.full_steps:  # the last step's result is scored, not stepped from
            break
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # faces stay independent: each face's loss depends on its own coefficients only
        opt.step()
    return best


def fit_to_landmarks(decoder: FaceDecoder, start: torch.Tensor, lmk_px: torch.Tensor, lmk_weights: torch.Tensor,
                     steps: int, lr: float, landmark_weight: float, coefficient_weight: float) -> torch.Tensor:
    """The landmark stage: Adam on pose, translation, identity and expression (LANDMARK_STAGE_GROUPS) against
    landmarks alone, no rendering. start: (B, C); lmk_px: (B, 68, 2) crop px; lmk_weights: (68,); the loss is
    landmark_weight x landmark_loss + coefficient_weight x (|id|^2 + |exp|^2) per face. Returns (B, C), detached."""
    coeffs = start.detach().clone().requires_grad_(True)
    b = coeffs.shape[0]
    grad_mask = _group_mask(decoder, LANDMARK_STAGE_GROUPS, coeffs)
    opt = torch.optim.Adam([coeffs], lr=lr)
    for _ in range(steps):
        c = decoder.layout.split(coeffs)
        lmk = decoder.landmark_px(c)
        loss = b * (landmark_weight * landmark_loss(lmk, lmk_px, lmk_weights)
                    + coefficient_weight * (c.id.square().sum() + c.exp.square().sum()) / b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        coeffs.grad.mul_(grad_mask)
        opt.step()
    return coeffs.detach()


def face_totals(terms: dict[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    """Each face's weighted hybrid loss (B,) from its unweighted terms {name: (B,)} (per_face_terms)."""
    return sum(getattr(weights, name) * value for name, value in terms.items())


def per_face_terms(decoder: FaceDecoder, face: FaceRender, coeffs: torch.Tensor, photo: torch.Tensor,
                   face_mask: torch.Tensor, lmk_px: torch.Tensor, lmk_weights: torch.Tensor,
                   weights: LossWeights) -> dict[str, torch.Tensor]:
    """The unweighted hybrid loss terms of each face of a rendered batch: {name: (B,)}. face: the render of
    coeffs (B, C); the other tensors as in fit_coefficients. Rendering once and mapping hybrid_loss over the faces
    as batches of one (torch.func.vmap: the same terms as a loop over faces, in a few batched ops) keeps this cheap."""
    def one_face(face_i: FaceRender, coeffs_i: Coeffs, photo_i, face_mask_i, lmk_px_i) -> dict[str, torch.Tensor]:
        face_1 = FaceRender(Decoded(*(t[None] for t in face_i.decoded)), *(t[None] for t in face_i[1:]))
        _, terms = hybrid_loss(face_1, Coeffs(*(t[None] for t in coeffs_i)), photo_i[None], face_mask_i[None],
                               lmk_px_i[None], lmk_weights, decoder.face_region, weights)
        return terms

    return torch.func.vmap(one_face)(face, decoder.layout.split(coeffs), photo, face_mask, lmk_px)
