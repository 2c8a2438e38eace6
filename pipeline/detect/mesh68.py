"""MediaPipe's 468-point face mesh -> the 68 iBUG / 300-W landmarks.

Each iBUG point is one mesh vertex (MESH_TO_IBUG68), chosen by scripts/derive_mesh68.py on the sample photos
against dlib's points (left-right symmetric; 2.6 % NME from dlib there, dlib's own error being ~2 %). The jaw
points 0-7 and 9-16 follow the 2D silhouette, as 300-W annotators place them: each slides along a row of mesh
vertices on its side of the face (MESH_JAW_CANDIDATES) to the outermost one across the face, measured along the
eye line, so a turned head's jaw lies on its visible outline rather than on hidden fixed vertices.
"""
from __future__ import annotations

import numpy as np

from .mediapipe import MESH_EYE_CORNERS, N_MESH

MESH_TO_IBUG68 = (127, 234, 177, 215, 172, 136, 149, 148, 152, 377, 378, 365, 397, 435, 401, 454, 356,  # jaw
                  70, 63, 52, 65, 55, 285, 295, 282, 293, 300,  # brows
                  168, 197, 5, 4, 75, 97, 2, 326, 305,  # nose
                  7, 159, 158, 155, 153, 144, 382, 385, 386, 249, 373, 380,  # eyes
                  61, 39, 37, 11, 267, 269, 291, 405, 314, 17, 84, 181,  # outer lips
                  183, 38, 13, 268, 407, 317, 14, 87)  # inner lips
MESH_JAW_CANDIDATES = (
    (7, 25, 33, 34, 35, 110, 127, 130, 143, 144, 145, 153, 163, 226), (116, 117, 118, 119, 227, 234),
    (177, 187, 206, 207), (186, 192, 215), (135, 172, 204, 210), (32, 136, 169), (140, 149, 171), (148,),
    (377,), (369, 378, 396), (262, 365, 394), (364, 397, 424, 430), (410, 416, 435), (401, 411, 426, 427),
    (345, 346, 347, 348, 447, 454), (249, 255, 263, 264, 265, 339, 356, 359, 372, 373, 374, 380, 390, 446))
JAW_POINTS = tuple(range(0, 8)) + tuple(range(9, 17))  # iBUG ids of MESH_JAW_CANDIDATES' rows


def mesh_to_ibug68(mesh_px: np.ndarray) -> np.ndarray:
    """mesh_px: (468, >=2) photo or crop px -> (68, 2) float64 iBUG landmarks in the same px, jaw on the silhouette."""
    mesh = np.asarray(mesh_px, np.float64)
    if mesh.ndim != 2 or mesh.shape[0] != N_MESH or mesh.shape[1] < 2:
        raise ValueError(f"mesh_px: expected ({N_MESH}, 2 or 3), got {mesh.shape}")
    xy = mesh[:, :2]
    lmk = xy[list(MESH_TO_IBUG68)].copy()
    across = xy[MESH_EYE_CORNERS[1]] - xy[MESH_EYE_CORNERS[0]]  # subject's right -> left, along the eye line
    across /= max(np.linalg.norm(across), 1e-9)
    for point, row in zip(JAW_POINTS, MESH_JAW_CANDIDATES):
        out = xy[list(row)] @ across * (-1.0 if point < 8 else 1.0)  # outward: -across on the right side
        lmk[point] = xy[row[int(np.argmax(out))]]
    return lmk
