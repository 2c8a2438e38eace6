"""Face-region mask from MediaPipe's 468-point face mesh (no parsing network).

The face is the union of the mesh's triangles (MediaPipe's canonical triangulation, canonical_face_model.obj,
whose faces index the 468 points in the network's output order), rasterised in crop pixels; a profile needs no
special case, since the union of the projected triangles is the mesh's silhouette. The eyes, eyebrows and the
inner mouth are cut out as polygons of the mesh's standard contours (the index lists below). Geometry alone
cannot see what covers the face (hair over the forehead, a hand, a microphone), so the region is multiplied by a
soft gate on the skin colour likelihood of skin_model.skin_posterior: weight min(1, p(skin | colour) / skin_gate),
i.e. full weight wherever skin is at least `skin_gate` likely, falling linearly to 0 for colours that are surely
not skin. The edges are feathered as in the skin model (skin_model.feather).

Contour indices: MediaPipe's face_mesh_connections.py (google-ai-edge/mediapipe, mediapipe/python/solutions)
lists each contour as edges (a, b); here each is one closed polygon, its vertices in order around the outline.
MediaPipe's "left" is the subject's left (canonical x > 0, image right in a frontal crop).
"""
from __future__ import annotations

import functools

import cv2
import numpy as np

from ..face_model.mediapipe_mesh import read_canonical_obj
from .skin_model import SUBPIXEL_BITS, face_regions, feather, polygons_mask, skin_posterior

N_MESH = 468
# Eye openings (FACEMESH_LEFT_EYE / RIGHT_EYE): lower lid from the outer to the inner corner, then the upper lid
# back (the corners 263/362 and 33/133 are shared by both lids, so each appears once).
LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
# Eyebrows (FACEMESH_LEFT_EYEBROW / RIGHT_EYEBROW are two open polylines each, the brow's upper and lower edge):
# the upper edge from the outer end inwards, then the lower edge back outwards.
LEFT_BROW = (300, 293, 334, 296, 336, 285, 295, 282, 283, 276)
RIGHT_BROW = (70, 63, 105, 66, 107, 55, 65, 52, 53, 46)
# Inner mouth (the inner lip contour of FACEMESH_LIPS): the lower inner lip from corner 78 to corner 308, then
# the upper inner lip back. A closed mouth makes it a sliver, an open one the opening.
INNER_MOUTH = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191)
HOLES = {"left_eye": LEFT_EYE, "right_eye": RIGHT_EYE, "left_brow": LEFT_BROW, "right_brow": RIGHT_BROW,
         "inner_mouth": INNER_MOUTH}


@functools.cache
def mesh_triangles(obj_path: str) -> np.ndarray:
    """The canonical triangulation (898, 3) int64 of MediaPipe's 468 points, read once per process."""
    return read_canonical_obj(obj_path)[1]


def check_mesh(mesh_px: np.ndarray) -> np.ndarray:
    """(468, 2 or 3) crop px -> (468, 2) float64 x, y; ValueError on another shape or a non-finite point."""
    mesh = np.asarray(mesh_px, np.float64)
    if mesh.ndim != 2 or mesh.shape[0] != N_MESH or mesh.shape[1] not in (2, 3):
        raise ValueError(f"mesh_px: expected ({N_MESH}, 3) crop px, got {mesh.shape}")
    if not np.isfinite(mesh[:, :2]).all():
        raise ValueError("mesh_px: non-finite points")
    return mesh[:, :2]


def mesh_regions(mesh_px: np.ndarray, triangles: np.ndarray, size_px: int) -> dict[str, np.ndarray]:
    """Regions of a crop from its face mesh, each (size_px, size_px) bool: 'face' (the union of the triangles)
    and 'holes' (eyes, brows and inner mouth, grown by 1 px as the skin model's holes are).
    mesh_px: (468, 2 or 3) crop px; triangles: (F, 3) indices into the 468 points."""
    mesh = check_mesh(mesh_px)
    # one polygon per call: cv2.fillPoly fills several polygons by parity, so where triangles overlap (a turned
    # face folds its far side over itself) a joint call would leave holes
    face = np.zeros((size_px, size_px), np.uint8)
    for corners in np.round(mesh[triangles] * (1 << SUBPIXEL_BITS)).astype(np.int32):
        cv2.fillConvexPoly(face, corners, 1, lineType=cv2.LINE_8, shift=SUBPIXEL_BITS)
    holes = np.logical_or.reduce([polygons_mask([mesh[list(idx)]], size_px) for idx in HOLES.values()])
    face = face.astype(bool)
    holes = cv2.dilate(holes.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    return {"face": face, "holes": holes}


def mesh_mask(crop_rgb: np.ndarray, mesh_px: np.ndarray, lmk_px: np.ndarray, triangles: np.ndarray,
              skin_gate: float = 0.5, feather_px: float = 2.0, forehead_lift: float = 0.3) -> np.ndarray:
    """Soft face weights of an aligned crop from its face mesh, gated by skin colour (module docstring).

    crop_rgb: (S, S, 3) uint8 RGB; mesh_px: (468, 3) crop px; lmk_px: (68, 2) crop px, which place the skin
    model's colour samples (inner cheeks and nose; background outside the 68-point outline lifted by
    forehead_lift); triangles: (F, 3) the canonical triangulation; skin_gate: p(skin) at and above which a pixel
    keeps full weight, in [0, 1] (0: no gate, the mesh region alone); feather_px: Gaussian sigma of the edges, px.
    Returns (S, S) float32 in [0, 1].
    """
    if crop_rgb.ndim != 3 or crop_rgb.shape[2] != 3 or crop_rgb.shape[0] != crop_rgb.shape[1]:
        raise ValueError(f"crop_rgb: expected (S, S, 3), got {crop_rgb.shape}")
    if not 0 <= skin_gate <= 1:
        raise ValueError(f"skin_gate: expected [0, 1], got {skin_gate}")
    size = crop_rgb.shape[0]
    regions = mesh_regions(mesh_px, triangles, size)
    inside = regions["face"] & ~regions["holes"]
    if skin_gate > 0:
        samples = face_regions(lmk_px, size, forehead_lift)
        posterior = skin_posterior(crop_rgb, samples["skin_samples"] & inside, samples["background_samples"],
                                   regions["face"])
        gate = np.minimum(1.0, posterior / skin_gate).astype(np.float32)
    else:
        gate = np.ones((size, size), np.float32)
    return feather(inside.astype(np.float32), gate, feather_px)


def mesh_usable(mesh_px, mesh_score, min_score: float) -> str | None:
    """None when a face's mesh can make its mask, else why not (the fallback reason recorded per face):
    missing, a wrong shape or non-finite points, or a confidence below min_score."""
    if mesh_px is None or mesh_score is None:
        return "no face mesh"
    try:
        check_mesh(np.asarray(mesh_px, np.float64).reshape(N_MESH, -1))
    except ValueError as error:
        return f"unusable face mesh: {error}"
    if not float(mesh_score) >= min_score:  # NaN scores fall back too
        return f"mesh_score {float(mesh_score):.3f} < {min_score}"
    return None

