"""Convert the Surrey Face Model (eos cereal .bin files) into the face model format.

SFM 3448 has 63 PCA shape components, 6 expression blendshapes and no colour model: the mean albedo is
a uniform skin tone and the albedo basis is empty (K_alb = 0) until the `albedo` stage fits one.
Its landmark mapping (ibug_to_sfm.txt) leaves out the jaw contour (iBUG 1-8, 10-17) and the inner mouth
corners (61, 65); `derive_landmarks` fills them in from the BFM mean 68-landmark template
(similarity_Lm3D_all.mat) brought into SFM space by a similarity fitted on the mapped landmarks.
ibug_to_sfm.txt's inner vertices (iBUG 17-67) sit 1-3 mm off where 300-W annotators put those points; by default
(`landmarks="fitted"`) they are replaced by FITTED_INNER_LANDMARKS, re-chosen on the sample photos against dlib's
predictor (trained on 300-W), which cuts the model's own landmark error on the held-out annotated photos
(scripts/derive_landmarks.py has the method and the numbers).
"""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
from scipy.io import loadmat

from .format import LANDMARK_CHOICES, N_LANDMARKS, FaceModel, no_mesh468, outward_winding

SFM_LICENCE = ("Surrey Face Model: free for non-commercial (research) use only; see the eos project "
               "(github.com/patrikhuber/eos). eos code: Apache-2.0.")
# Vertices closer than this to an eye, brow or lip landmark are not "skin" for albedo statistics.
NON_SKIN_RADIUS_MM = 9.0
NON_SKIN_LANDMARKS = list(range(17, 27)) + list(range(36, 48)) + list(range(48, 68))
# iBUG 17-67 (0-based) -> SFM vertex: scripts/derive_landmarks.py --model sfm on the 28 sample faces (8 mm search
# radius, under the reconstruct stage's fit): 40 of 51 moved (mean 2.91 mm, max 7.07 mm); the output landmarks'
# inner residual against dlib 3.98 -> 2.89 px RMS, per-landmark bias 2.51 -> 1.14 px
FITTED_INNER_LANDMARKS = (
    2446, 1127, 2552, 2086, 2183, 2185, 2091, 2558, 1128, 2447,  # brows 17-26
    2774, 379, 2574, 3420, 1602, 2793, 3038, 2795, 1603,         # nose 27-35
    177, 172, 1418, 181, 3024, 2820, 614, 1419, 605, 610, 2822, 3026,  # eyes 36-47
    3307, 3086, 3281, 3404, 3283, 3089, 3309, 2936, 2965, 3126, 2963, 2933,  # outer lips 48-59
    3426, 1664, 423, 1722, 3427, 815, 442, 402)              # inner lips 60-67


def read_ibug_mapping(path: str | Path) -> dict[int, int]:
    """ibug_to_sfm.txt (TOML) -> {0-based iBUG index: SFM vertex index} for the landmarks it maps."""
    table = tomllib.loads(Path(path).read_text())["landmark_mappings"]
    return {int(k) - 1: int(v) for k, v in table.items()}


def similarity_fit(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity (Umeyama) with dst ~ s * R @ src + t. src, dst: (N, D) -> (s, R (D, D), t (D,))."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(b.T @ a / len(src))
    d = np.ones(len(sig))
    d[-1] = np.sign(np.linalg.det(u @ vt))
    rot = u @ np.diag(d) @ vt
    scale = float((sig * d).sum() / (a ** 2).sum() * len(src))
    return scale, rot, mu_d - scale * rot @ mu_s


def derive_landmarks(mean_mm: np.ndarray, mapping: dict[int, int], contours: dict[str, list[int]],
                     template_68: np.ndarray) -> np.ndarray:
    """Complete the 68 landmark vertices.

    mean_mm: (V, 3) mean shape; mapping: known {iBUG idx: vertex}; contours: 'right_contour'/'left_contour'
    vertex lists (subject's right = -x); template_68: (68, 3) mean 3D landmarks in any similar frame.
    Jaw points snap to the contour vertex nearest in the frontal (x, y) projection, since 2D jaw annotations
    lie on the silhouette; other missing points (the inner mouth corners) snap to the nearest unused vertex in 3D.
    Returns (68,) int64.
    """
    known = sorted(mapping)
    scale, rot, t = similarity_fit(template_68[known], mean_mm[[mapping[i] for i in known]])
    target = template_68 @ (scale * rot).T + t
    out = np.full(N_LANDMARKS, -1, np.int64)
    for i, v in mapping.items():
        out[i] = v
    jaw_sides = {"right_contour": range(0, 8), "left_contour": range(9, 17)}
    for side, idxs in jaw_sides.items():
        cand = np.asarray(contours[side])
        for i in idxs:
            if out[i] < 0:
                out[i] = cand[np.argmin(((mean_mm[cand, :2] - target[i, :2]) ** 2).sum(1))]
    # Excluding used vertices keeps e.g. the inner mouth corners off the outer corners' vertices.
    dist = ((mean_mm[None] - target[:, None]) ** 2).sum(-1)
    dist[:, out[out >= 0]] = np.inf
    for i in np.flatnonzero(out < 0):
        out[i] = int(np.argmin(dist[i]))
        dist[:, out[i]] = np.inf
    return out


def skin_region(mean_mm: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """(V,) float32 in {0, 1}: 0 within NON_SKIN_RADIUS_MM of a brow, eye or lip landmark vertex, else 1."""
    pts = mean_mm[landmarks[NON_SKIN_LANDMARKS]]
    dist = np.sqrt(((mean_mm[:, None, :] - pts[None]) ** 2).sum(-1)).min(1)
    return (dist > NON_SKIN_RADIUS_MM).astype(np.float32)


def convert_sfm(sfm_dir: str | Path, bfm_aux_dir: str | Path, albedo_rgb: tuple[float, float, float],
                landmarks: str = "fitted") -> FaceModel:
    """Read sfm_shape_3448.bin, expression_blendshapes_3448.bin, ibug_to_sfm.txt, sfm_model_contours.json from
    `sfm_dir` and the 68-landmark template from `bfm_aux_dir`; albedo_rgb: uniform reflectance in [0, 1];
    landmarks: "fitted" (inner points FITTED_INNER_LANDMARKS) or "model_file" (ibug_to_sfm.txt's vertices)."""
    if landmarks not in LANDMARK_CHOICES:
        raise ValueError(f"SFM landmarks must be one of {LANDMARK_CHOICES}, got {landmarks!r}")
    import eos  # the cereal .bin format is eos's own; eos-py is the reference reader

    sfm_dir, bfm_aux_dir = Path(sfm_dir), Path(bfm_aux_dir)
    model = eos.morphablemodel.load_model(str(sfm_dir / "sfm_shape_3448.bin"))
    shape = model.get_shape_model()
    mean = np.asarray(shape.get_mean(), np.float64).reshape(-1, 3)
    id_basis = np.asarray(shape.get_rescaled_pca_basis(), np.float32)  # orthonormal basis x sqrt(eigenvalue)
    blendshapes = eos.morphablemodel.load_blendshapes(str(sfm_dir / "expression_blendshapes_3448.bin"))
    exp_basis = np.stack([np.asarray(b.deformation, np.float32) for b in blendshapes], axis=1)
    tris = np.asarray(shape.get_triangle_list(), np.int64)
    mean -= mean.mean(0)
    tris = outward_winding(mean, tris)

    mapping = read_ibug_mapping(sfm_dir / "ibug_to_sfm.txt")
    contours = json.loads((sfm_dir / "sfm_model_contours.json").read_text())["model_contour"]
    template = loadmat(str(bfm_aux_dir / "similarity_Lm3D_all.mat"))["lm"].astype(np.float64)
    landmark_ids = derive_landmarks(mean, mapping, contours, template)
    if landmarks == "fitted":
        landmark_ids[17:] = FITTED_INNER_LANDMARKS
    n = mean.shape[0]
    return FaceModel(
        mean_shape=mean.astype(np.float32), id_basis=id_basis, exp_basis=exp_basis,
        mean_albedo=np.tile(np.asarray(albedo_rgb, np.float32), (n, 1)),
        albedo_basis=np.zeros((3 * n, 0), np.float32), triangles=tris, landmarks=landmark_ids,
        face_region=skin_region(mean, landmark_ids), **no_mesh468(),
        name="Surrey Face Model 3448", version="sfm3448-shape+6exp", licence=SFM_LICENCE)

