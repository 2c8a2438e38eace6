"""Comparing face models on the same faces: a model-agnostic surface error and the per-set summaries of the
`model_comparison` stage (stages/model_comparison.py).

Two models have no vertex correspondence, so the shape error of a fit is measured NoW-style
(now.scan_to_mesh_distance): the predicted mesh is aligned rigidly on the 51 inner landmarks (brows, eyes, nose,
mouth: the same anatomy on every model, unlike the jaw, whose vertices follow each model's convention) of the
ground-truth mesh, then every ground-truth point of the compared area gets its exact distance to the predicted
surface. The compared area is the front face that every model covers: ground-truth vertices within
SURFACE_RADIUS_MM of its nose tip (iBUG 30) and inside its face region (face_region > 0: skin, away from the
eyes, brows and lips, whose openings differ between models).
"""
from __future__ import annotations

import numpy as np

from .metrics import INNER_POINTS, check_shape, landmark_nme
from .now import scan_to_mesh_distance

# The nose tip to the chin or the forehead is ~70 mm, to the cheeks' outer edge ~75 mm: 75 keeps a face both
# the SFM's and ICT's narrow mesh cover.
SURFACE_RADIUS_MM = 75.0
NOSE_TIP = 30


def compared_points(gt_mm: np.ndarray, gt_landmarks: np.ndarray, gt_region: np.ndarray) -> np.ndarray:
    """(V,) bool: the vertices of a ground-truth mesh gt_mm (V, 3) mm in the compared area (module docstring);
    gt_landmarks (68,) its landmark vertex ids, gt_region (V,) its face_region."""
    near = np.linalg.norm(gt_mm - gt_mm[gt_landmarks[NOSE_TIP]], axis=1) < SURFACE_RADIUS_MM
    return near & (gt_region > 0)


def surface_errors(gt_mm: np.ndarray, gt_landmarks: np.ndarray, gt_region: np.ndarray, pred_mm: np.ndarray,
                   pred_tris: np.ndarray, pred_landmarks: np.ndarray, mode: str = "rigid") -> np.ndarray:
    """Per face, the mean distance (mm) from the compared ground-truth points to the predicted surface after the
    inner-landmark alignment. gt_mm: (N, V, 3) mm, gt_landmarks (68,), gt_region (V,) of the model that drew the
    faces; pred_mm: (N, U, 3) mm, pred_tris (F, 3), pred_landmarks (68,) of the fitted model. Returns (N,) mm."""
    check_shape("gt_mm", gt_mm, (None, len(gt_region), 3))
    check_shape("pred_mm", pred_mm, (gt_mm.shape[0], None, 3))
    out = []
    for gt, pred in zip(gt_mm, pred_mm):
        points = gt[compared_points(gt, gt_landmarks, gt_region)]
        dist = scan_to_mesh_distance(points, pred, pred_tris, gt[gt_landmarks[INNER_POINTS]],
                                     pred[pred_landmarks[INNER_POINTS]], mode)
        out.append(dist.mean())
    return np.asarray(out, np.float64)


def set_summary(pred_lmk_px: np.ndarray, gt_lmk_px: np.ndarray, surface_mm: np.ndarray, faces: int) -> dict:
    """One (drawing model, fitted model) cell: faces drawn, faces found, mean landmark NME (all 68, inner 51) and
    mean surface error (mm) over the found faces. pred_lmk_px, gt_lmk_px: (N, 68, 2) px; surface_mm (N,)."""
    found = len(surface_mm)
    return {"faces": int(faces), "found": int(found),
            "nme": float(landmark_nme(pred_lmk_px, gt_lmk_px).mean()) if found else None,
            "nme_inner": float(landmark_nme(pred_lmk_px, gt_lmk_px, INNER_POINTS).mean()) if found else None,
            "surface_error_mm": float(surface_mm.mean()) if found else None}
