"""Render decoded faces: the forward model shared by training, fitting, synthesis and reports."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..face_model import Decoded, FaceDecoder
from . import render


class FaceRender(NamedTuple):
    decoded: Decoded
    image: torch.Tensor   # (B, 3, S, S) shaded albedo, 0 outside the face
    mask: torch.Tensor    # (B, 1, S, S) render coverage in {0, 1}
    tri_id: torch.Tensor  # (B, 1, S, S) int64, -1 outside
    depth: torch.Tensor   # (B, 1, S, S) world units


def render_face(decoder: FaceDecoder, coeffs: torch.Tensor) -> FaceRender:
    """coeffs: (B, decoder.layout.size) -> FaceRender at the decoder camera's image size."""
    decoded = decoder(coeffs)
    size = decoder.camera.size_px
    out = render(decoded.verts_px, decoder.triangles, decoded.colors, size, size)
    return FaceRender(decoded, out.image, out.mask, out.tri_id, out.depth)
