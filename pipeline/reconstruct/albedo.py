"""Build an albedo (reflectance) model from photos, for face models that have none (the default SFM).

For each fitted face: sample the photo's colour at every vertex, divide out the fitted SH irradiance to get
reflectance, and weight each sample by how much it can be trusted:

    weight = visible x cos(angle between normal and view ray) x face-mask value at the vertex

`visible` means the vertex is a corner of a triangle that won a pixel in the z-buffer and faces the camera;
the cosine down-weights grazing views, where one pixel covers a long stretch of surface and shading is least
certain; the mask keeps hair, glasses and background out. The mean albedo is the weighted mean per vertex,
shrunk towards the weighted mean colour of all vertices by `prior_weight`, as if each vertex had also been seen
that much in the overall colour (a vertex never seen gets that colour). A face contributes at most 1 to a
vertex's weight; vertices at the edge of every face's mask are seen once, faintly: without the prior one such
sample decides their colour, and on ICT, whose narrow area reaches the hairline, 111 vertices (97 in the face
region) came out darker than 0.3 in luminance from a fringe of hair at a mask's edge (total weight median 0.15,
one face each), a dark band along the forehead of every render. With prior_weight 1 none does, and vertices seen
well (total weight > 5, most of the face) move by 0.003 on average (24 training faces, SFM and ICT alike).
The basis is the PCA of the faces' reflectance maps after filling each face's unseen vertices with the mean,
scaled by the component standard deviations so coefficients are ~N(0, 1), as for the shape bases.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..face_model import FaceDecoder, sh_shading
from ..render.face import render_face
from .batch import visible_vertices

MIN_IRRADIANCE = 0.05  # reflectance = colour / irradiance is meaningless in the dark


def sample_at_vertices(image: torch.Tensor, verts_px: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of image (B, C, S, S) at verts_px (B, V, >=2) pixel centres -> (B, V, C)."""
    s = image.shape[-1]
    grid = (verts_px[..., :2] + 0.5) / s * 2 - 1  # pixel centre x=j lies at (j + 0.5) / S in [0, 1]
    out = F.grid_sample(image, grid[:, :, None, :], mode="bilinear", padding_mode="border", align_corners=False)
    return out[..., 0].transpose(1, 2)


def reflectance_samples(decoder: FaceDecoder, coeffs: torch.Tensor, photo: torch.Tensor,
                        face_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vertex reflectance seen in each photo and its weight (see module docstring).

    coeffs: (B, C) fitted; photo: (B, 3, S, S) in [0, 1]; face_mask: (B, 1, S, S) in [0, 1].
    Returns reflectance (B, V, 3) and weight (B, V) >= 0 (0 where unseen).
    """
    with torch.no_grad():
        face = render_face(decoder, coeffs)
        d = face.decoded
        visible = visible_vertices(face, decoder.triangles, d.verts_cam.shape[1])
        irradiance = sh_shading(d.normals_cam, decoder.layout.split(coeffs).sh)
        colour = sample_at_vertices(photo, d.verts_px)
        view = F.normalize(torch.tensor([0.0, 0.0, decoder.camera.distance], device=coeffs.device) - d.verts_cam,
                           dim=-1)
        cosine = (d.normals_cam * view).sum(-1).clamp_min(0)
        mask = sample_at_vertices(face_mask, d.verts_px)[..., 0]
        lit = irradiance.min(-1).values > MIN_IRRADIANCE
        weight = visible.float() * cosine * mask * lit.float()
        reflectance = colour / irradiance.clamp_min(MIN_IRRADIANCE)
    return reflectance, weight


def build_albedo_model(reflectance: np.ndarray, weight: np.ndarray, n_components: int, prior_weight: float,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """reflectance: (N, V, 3), weight: (N, V) -> mean_albedo (V, 3) in [0, 1], albedo_basis (V*3, K) with
    K = min(n_components, N - 1) components scaled by their standard deviation. prior_weight >= 0: the weight
    of the overall mean colour in each vertex's mean (module docstring; 0 = the plain weighted mean)."""
    if reflectance.ndim != 3 or reflectance.shape[2] != 3 or weight.shape != reflectance.shape[:2]:
        raise ValueError(f"reflectance (N, V, 3) and weight (N, V) expected, got {reflectance.shape}, {weight.shape}")
    if not prior_weight >= 0:
        raise ValueError(f"prior_weight: expected >= 0, got {prior_weight}")
    n, v, _ = reflectance.shape
    total = weight.sum(0)
    if not (total > 0).any():
        raise ValueError("no vertex was seen in any photo: cannot estimate an albedo model")
    overall = (reflectance * weight[..., None]).sum((0, 1)) / weight.sum()
    shrunk = ((reflectance * weight[..., None]).sum(0) + prior_weight * overall) / np.maximum(
        total + prior_weight, 1e-12)[:, None]
    mean = np.clip(np.where(total[:, None] > 0, shrunk, overall), 0.0, 1.0)
    k = max(0, min(n_components, n - 1))
    if k == 0:
        return mean.astype(np.float32), np.zeros((3 * v, 0), np.float32)
    seen = weight > 0
    filled = np.where(seen[..., None], reflectance, mean[None])
    centred = (filled - mean[None]).reshape(n, -1)
    _, sing, vt = np.linalg.svd(centred, full_matrices=False)
    basis = vt[:k].T * (sing[:k] / np.sqrt(n - 1))
    return mean.astype(np.float32), basis.astype(np.float32)
