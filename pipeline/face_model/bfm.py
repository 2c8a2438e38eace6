"""Convert the Basel Face Model 2009 + the 3DFace expression basis into the face model format.

Inputs: the user's licensed `01_MorphableModel.mat` (BFM 2009, 53,490 vertices, coordinates in micrometres)
and `Exp_Pca.bin` (Guo et al.'s expression PCA over 53,215 vertices), plus the MIT-licensed index files of
Deep3DFaceRecon_pytorch in ../shared/face_models/bfm_aux. The result matches Deep3DFaceRecon's
`BFM_model_front.mat` (35,709 vertices; 80 id, 64 exp, 80 albedo components, bases scaled by their
standard deviations) except for units: shape in mm (theirs: decimetres) and albedo in [0, 1] (theirs: 0-255).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.io import loadmat

from .format import FaceModel, FaceModelError, no_mesh468, outward_winding

BFM_VERTS = 53490
EXP_VERTS = 53215
FRONT_VERTS = 35709
K_ID, K_EXP, K_ALB = 80, 64, 80
UM_TO_MM = 1e-3
BFM_LICENCE = ("Basel Face Model 2009: licensed by the University of Basel for non-commercial research only; "
               "expression basis from Guo et al. (3DFace); index files from Deep3DFaceRecon_pytorch (MIT).")

# key -> (rows, minimum columns) in 01_MorphableModel.mat
_MAT_KEYS = {
    "shapeMU": (3 * BFM_VERTS, 1), "shapePC": (3 * BFM_VERTS, K_ID), "shapeEV": (None, 1),
    "texMU": (3 * BFM_VERTS, 1), "texPC": (3 * BFM_VERTS, K_ALB), "texEV": (None, 1),
}


def _require(arrays: dict, key: str, rows: int | None, min_cols: int, source: Path) -> np.ndarray:
    if key not in arrays:
        raise FaceModelError(f"{source}: missing key '{key}'")
    arr = np.asarray(arrays[key])
    if arr.ndim != 2 or (rows is not None and arr.shape[0] != rows) or arr.shape[1] < min_cols:
        want = f"({rows if rows is not None else '*'}, >={min_cols})"
        raise FaceModelError(f"{source}: '{key}' has shape {arr.shape}, expected {want}")
    if not np.isfinite(arr).all():
        raise FaceModelError(f"{source}: '{key}' contains NaN or Inf")
    return arr


def read_exp_pca(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Exp_Pca.bin: int32 K, float32 mean (3*53215), float32 basis (K, 3*53215) -> (mean (3N,), basis (3N, K))."""
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < 4:
        raise FaceModelError(f"{path}: too short for an Exp_Pca.bin header")
    k = int(np.frombuffer(raw[:4], np.int32)[0])
    expected = 4 + 4 * 3 * EXP_VERTS * (1 + k)
    if k < K_EXP or len(raw) != expected:
        raise FaceModelError(f"{path}: {len(raw)} bytes with K={k}; an Exp_Pca.bin over {EXP_VERTS} vertices "
                             f"with K>={K_EXP} components has 4 + 4*3*{EXP_VERTS}*(1+K) bytes")
    body = np.frombuffer(raw[4:], np.float32)
    mean, basis = body[:3 * EXP_VERTS], body[3 * EXP_VERTS:].reshape(k, 3 * EXP_VERTS).T
    return mean, basis


def _index(aux: Path, file: str, key: str, length: int, upper: int) -> np.ndarray:
    """A 1-based index column from a bfm_aux .mat -> 0-based int64 (length,), range-checked."""
    arr = loadmat(str(aux / file))[key].astype(np.int64).reshape(-1) - 1
    if arr.shape != (length,) or arr.min() < 0 or arr.max() >= upper:
        raise FaceModelError(f"{aux / file}: '{key}' must hold {length} indices in [1, {upper}]")
    return arr


def convert_bfm(morphable_model_mat: str | Path, exp_pca_bin: str | Path, bfm_aux_dir: str | Path) -> FaceModel:
    """Build the 35,709-vertex BFM09 front-face model (Deep3DFaceRecon's transferBFM09, in mm / [0, 1])."""
    mat_path, aux = Path(morphable_model_mat), Path(bfm_aux_dir)
    try:
        bfm = loadmat(str(mat_path))
    except Exception as err:
        raise FaceModelError(f"{mat_path}: cannot read as a MATLAB .mat ({err})") from None
    a = {k: _require(bfm, k, rows, cols, mat_path) for k, (rows, cols) in _MAT_KEYS.items()}
    if a["shapeEV"].shape[0] != a["shapePC"].shape[1] or a["texEV"].shape[0] != a["texPC"].shape[1]:
        raise FaceModelError(f"{mat_path}: shapeEV/texEV length must equal the number of shapePC/texPC columns")
    _, exp_pc = read_exp_pca(exp_pca_bin)  # Deep3DFaceRecon ignores the expression mean too
    exp_std = np.loadtxt(aux / "std_exp.txt").reshape(-1)
    if exp_std.shape[0] != exp_pc.shape[1]:
        raise FaceModelError(f"{aux / 'std_exp.txt'}: {exp_std.shape[0]} values for {exp_pc.shape[1]} components")

    # Deep3DFaceRecon: front = BFM_front_idx into the expression vertices; shape index = trimIndex[front].
    front_in_exp = _index(aux, "BFM_front_idx.mat", "idx", FRONT_VERTS, EXP_VERTS)
    exp_in_bfm = _index(aux, "BFM_exp_idx.mat", "trimIndex", EXP_VERTS, BFM_VERTS)
    front_in_bfm = exp_in_bfm[front_in_exp]

    def per_vertex(basis: np.ndarray, index: np.ndarray) -> np.ndarray:
        k = basis.shape[1]
        return basis.reshape(-1, 3, k)[index].reshape(-1, k)

    id_basis = per_vertex(a["shapePC"][:, :K_ID] * a["shapeEV"][:K_ID, 0] * UM_TO_MM, front_in_bfm)
    alb_basis = per_vertex(a["texPC"][:, :K_ALB] * a["texEV"][:K_ALB, 0] / 255.0, front_in_bfm)
    exp_basis = per_vertex(exp_pc[:, :K_EXP] * exp_std[:K_EXP] * UM_TO_MM, front_in_exp)
    mean = a["shapeMU"].reshape(-1, 3)[front_in_bfm] * UM_TO_MM
    mean = mean - mean.mean(0)
    albedo = np.clip(a["texMU"].reshape(-1, 3)[front_in_bfm] / 255.0, 0.0, 1.0)

    info = loadmat(str(aux / "facemodel_info.mat"))
    tris = outward_winding(mean, info["tri"].astype(np.int64) - 1)
    keypoints = info["keypoints"].astype(np.int64).reshape(-1) - 1
    skin = info["skinmask"].astype(np.float32).reshape(-1)
    return FaceModel(
        mean_shape=mean.astype(np.float32), id_basis=id_basis.astype(np.float32),
        exp_basis=exp_basis.astype(np.float32), mean_albedo=albedo.astype(np.float32),
        albedo_basis=alb_basis.astype(np.float32), triangles=tris, landmarks=keypoints, face_region=skin,
        **no_mesh468(),
        name="Basel Face Model 2009 (front) + 3DFace expressions", version="bfm09-front-80id-64exp-80alb",
        licence=BFM_LICENCE)
