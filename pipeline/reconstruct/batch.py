"""Batch reconstruction: faces (aligned crops + masks + landmarks) -> coefficients (B, C) by one of METHODS."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..face_model import FaceDecoder
from ..render.face import FaceRender
from .fit import FitSettings, fit_coefficients

METHODS = ("fit", "network", "network+fit")


@dataclass
class FaceBatch:
    """Aligned faces as tensors on one device."""
    photo: torch.Tensor      # (B, 3, S, S) crops in [0, 1]
    face_mask: torch.Tensor  # (B, 1, S, S) in [0, 1]
    lmk_px: torch.Tensor     # (B, 68, 2) the landmarks to fit (landmarks.source), crop px
    mesh_px: torch.Tensor    # (B, 468, 3) MediaPipe face mesh, crop px (z away from the camera)

    def __getitem__(self, faces: slice) -> "FaceBatch":
        """The faces of a slice (views, no copies)."""
        return FaceBatch(self.photo[faces], self.face_mask[faces], self.lmk_px[faces], self.mesh_px[faces])


def reconstruct_batch(decoder: FaceDecoder, batch: FaceBatch, method: str, fit: FitSettings,
                      network: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      refine_steps: int = 0) -> torch.Tensor:
    """Coefficients (B, C) by `method`: 'fit' (analysis by synthesis from the mean face), 'network' (one R-Net
    forward pass), 'network+fit' (the R-Net prediction refined by the landmark stage and `refine_steps` full
    fitting steps)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "fit":
        return fit_coefficients(decoder, batch.photo, batch.face_mask, batch.lmk_px, fit,
                                mesh_px=batch.mesh_px)
    if network is None:
        raise ValueError(f"method {method!r} needs a trained network (models/rnet.pt)")
    with torch.no_grad():
        coeffs = network(batch.photo)
    if method == "network+fit":
        refine = replace(fit, full_steps=refine_steps)
        return fit_coefficients(decoder, batch.photo, batch.face_mask, batch.lmk_px, refine, init=coeffs,
                                mesh_px=batch.mesh_px)
    return coeffs


def visible_vertices(face: FaceRender, triangles: torch.Tensor, n_verts: int) -> torch.Tensor:
    """(B, V) bool: corners of triangles that won at least one pixel and whose normals face the camera."""
    b = face.tri_id.shape[0]
    won = torch.zeros(b, triangles.shape[0] + 1, device=triangles.device)
    won.scatter_(1, face.tri_id.view(b, -1) + 1, 1.0)  # column 0 collects the background id -1
    hits = torch.zeros(b, n_verts, device=triangles.device)
    hits.index_add_(1, triangles.reshape(-1), won[:, 1:].repeat_interleave(3, dim=1))
    return (hits > 0) & (face.decoded.normals_cam[..., 2] > 0)
