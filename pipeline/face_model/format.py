"""The face model file format (`models/face_model.npz`) and its validating loader.

Arrays (float32 unless noted), V vertices, F triangles, K_* components (any K may be 0):
- mean_shape   (V, 3)          mm, model space (docs/conventions.md), centred at the origin
- id_basis     (V*3, K_id)     mm per unit coefficient (bases are scaled by their standard deviation,
                               so coefficients are ~N(0, 1)); rows are vertex-major x0 y0 z0 x1 ...
- exp_basis    (V*3, K_exp)    mm per unit coefficient, same row order
- mean_albedo  (V, 3)          linear RGB reflectance in [0, 1]
- albedo_basis (V*3, K_alb)    reflectance per unit coefficient
- triangles    (F, 3) int64    vertex indices, counter-clockwise seen from outside (+z for a frontal face)
- landmarks    (68,) int64     vertex index of each iBUG-68 landmark (0-based iBUG order)
- face_region  (V,)            skin weight in [0, 1] (1 = cheek/forehead skin; used by the albedo
                               flatness loss and albedo statistics)
- mesh468_triangle    (N,) int64  the model triangle under each of MediaPipe's 468 face-mesh points
- mesh468_barycentric (N, 3)      the point's barycentric coordinates in that triangle (>= 0, sum 1)
- mesh468_weight      (N,)        its fitting weight in [0, 1] (0 = no counterpart on this model)
                                  N = 468, or 0 when the correspondence was not derived (mediapipe_mesh.py)
- exp_range    (2,)            the interval [lo, hi] every expression coefficient must lie in (ICT's blendshape
                               weights: [0, 1]); [-inf, inf] (no bound) for PCA expression models, and for
                               files written before the array existed
- jaw_candidates (16, K) int64 the vertex rows the silhouette jaw points 0-7, 9-16 slide along (-1 = padding), or
                 (0, 0): rows derived from the mean shape (decode.jaw_contour_candidates; files before the array)
plus 0-d strings: name, version, licence.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

N_LANDMARKS = 68
# which vertices carry the 68 landmarks (face_model.landmarks): "fitted" = the inner ones (iBUG 17-67) re-chosen
# on the sample photos against dlib (scripts/derive_landmarks.py), "model_file" = those of the model's own files
LANDMARK_CHOICES = ("fitted", "model_file")
N_MESH468 = 468
MESH468_ARRAYS = ("mesh468_triangle", "mesh468_barycentric", "mesh468_weight")
BARYCENTRIC_TOL = 1e-5
_STRINGS = ("name", "version", "licence")
UNBOUNDED = (-np.inf, np.inf)
_OPTIONAL = {"exp_range": lambda: np.asarray(UNBOUNDED, np.float32),  # array -> its value in older files
             "jaw_candidates": lambda: np.zeros((0, 0), np.int64)}
N_JAW_CANDIDATE_ROWS = 16


class FaceModelError(ValueError):
    """A face model file or array set that breaks the format; the message says what and where."""


@dataclass(frozen=True)
class FaceModel:
    mean_shape: np.ndarray
    id_basis: np.ndarray
    exp_basis: np.ndarray
    mean_albedo: np.ndarray
    albedo_basis: np.ndarray
    triangles: np.ndarray
    landmarks: np.ndarray
    face_region: np.ndarray
    mesh468_triangle: np.ndarray
    mesh468_barycentric: np.ndarray
    mesh468_weight: np.ndarray
    name: str
    version: str
    licence: str
    exp_range: np.ndarray = field(default_factory=_OPTIONAL["exp_range"])
    jaw_candidates: np.ndarray = field(default_factory=_OPTIONAL["jaw_candidates"])

    def __post_init__(self):
        validate_face_model(self)

    @property
    def n_verts(self) -> int:
        return self.mean_shape.shape[0]

    @property
    def k_id(self) -> int:
        return self.id_basis.shape[1]

    @property
    def k_exp(self) -> int:
        return self.exp_basis.shape[1]

    @property
    def k_alb(self) -> int:
        return self.albedo_basis.shape[1]

    @property
    def has_mesh468(self) -> bool:
        """Whether the MediaPipe 468-point correspondence was derived (N = 468, not 0)."""
        return self.mesh468_triangle.shape[0] == N_MESH468

    def with_albedo(self, mean_albedo: np.ndarray, albedo_basis: np.ndarray, version: str) -> "FaceModel":
        """A copy with a new colour model: mean_albedo (V, 3) in [0, 1], albedo_basis (V*3, K_alb)."""
        return replace(self, mean_albedo=np.asarray(mean_albedo, np.float32),
                       albedo_basis=np.asarray(albedo_basis, np.float32), version=version)


def no_mesh468() -> dict[str, np.ndarray]:
    """The mesh468_* arrays of a model without the 468-point correspondence (N = 0), as FaceModel keywords."""
    return {"mesh468_triangle": np.zeros(0, np.int64), "mesh468_barycentric": np.zeros((0, 3), np.float32),
            "mesh468_weight": np.zeros(0, np.float32)}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise FaceModelError(msg)


def validate_face_model(m: FaceModel) -> None:
    """Raise FaceModelError naming the first array whose shape, dtype, finiteness or index range is wrong."""
    for f in fields(m):
        value = getattr(m, f.name)
        if f.name in _STRINGS:
            _check(isinstance(value, str), f"{f.name}: expected a string, got {type(value).__name__}")
            continue
        _check(isinstance(value, np.ndarray), f"{f.name}: expected a numpy array, got {type(value).__name__}")
    v = m.mean_shape.shape[0] if m.mean_shape.ndim == 2 else -1
    _check(m.mean_shape.ndim == 2 and m.mean_shape.shape[1] == 3 and v > 0,
           f"mean_shape: expected (V, 3), got {m.mean_shape.shape}")
    expected = {
        "mean_shape": (np.float32, (v, 3)),
        "id_basis": (np.float32, (3 * v, None)),
        "exp_basis": (np.float32, (3 * v, None)),
        "mean_albedo": (np.float32, (v, 3)),
        "albedo_basis": (np.float32, (3 * v, None)),
        "triangles": (np.int64, (None, 3)),
        "landmarks": (np.int64, (N_LANDMARKS,)),
        "face_region": (np.float32, (v,)),
        "mesh468_triangle": (np.int64, (None,)),
        "mesh468_barycentric": (np.float32, (None, 3)),
        "mesh468_weight": (np.float32, (None,)),
        "exp_range": (np.float32, (2,)),
        "jaw_candidates": (np.int64, (None, None)),
    }
    for key, (dtype, shape) in expected.items():
        arr = getattr(m, key)
        _check(arr.dtype == dtype, f"{key}: expected dtype {np.dtype(dtype).name}, got {arr.dtype}")
        _check(arr.ndim == len(shape) and all(s is None or s == a for s, a in zip(shape, arr.shape)),
               f"{key}: expected shape {tuple('*' if s is None else s for s in shape)}, got {arr.shape}")
        if dtype == np.float32 and key != "exp_range":
            _check(bool(np.isfinite(arr).all()), f"{key}: contains NaN or Inf")
    lo, hi = m.exp_range
    _check(bool(lo < hi), f"exp_range: expected lo < hi (infinite for no bound), got {m.exp_range}")
    jaw = m.jaw_candidates
    if jaw.size:
        _check(jaw.shape[0] == N_JAW_CANDIDATE_ROWS and jaw.min() >= -1 and jaw.max() < v
               and bool((jaw >= 0).any(1).all()),
               f"jaw_candidates: expected ({N_JAW_CANDIDATE_ROWS}, K) vertex ids in [0, {v}) padded with -1, "
               f"each row non-empty, got shape {jaw.shape}, range [{jaw.min()}, {jaw.max()}]")
    _check(m.triangles.shape[0] > 0, "triangles: empty")
    for key in ("triangles", "landmarks"):
        arr = getattr(m, key)
        _check(arr.min() >= 0 and arr.max() < v,
               f"{key}: vertex indices must lie in [0, {v}), got [{arr.min()}, {arr.max()}]")
    _check(m.mean_albedo.min() >= 0 and m.mean_albedo.max() <= 1, "mean_albedo: values outside [0, 1]")
    _check(m.face_region.min() >= 0 and m.face_region.max() <= 1, "face_region: values outside [0, 1]")
    _validate_mesh468(m)


def _validate_mesh468(m: FaceModel) -> None:
    """The mesh468_* arrays (dtypes and ranks already checked): one length N in {0, 468}, triangle ids in range,
    barycentrics >= 0 summing to 1 within BARYCENTRIC_TOL, weights in [0, 1]."""
    n = m.mesh468_triangle.shape[0]
    _check(n in (0, N_MESH468), f"mesh468_triangle: expected 0 or {N_MESH468} points, got {n}")
    for key in MESH468_ARRAYS[1:]:
        _check(getattr(m, key).shape[0] == n, f"{key}: {getattr(m, key).shape[0]} points, mesh468_triangle has {n}")
    if n == 0:
        return
    tri, bary, weight = m.mesh468_triangle, m.mesh468_barycentric, m.mesh468_weight
    f = m.triangles.shape[0]
    _check(tri.min() >= 0 and tri.max() < f,
           f"mesh468_triangle: triangle indices must lie in [0, {f}), got [{tri.min()}, {tri.max()}]")
    _check(bary.min() >= 0, "mesh468_barycentric: negative coordinates")
    _check(np.abs(bary.astype(np.float64).sum(1) - 1).max() <= BARYCENTRIC_TOL,
           f"mesh468_barycentric: rows must sum to 1 within {BARYCENTRIC_TOL}")
    _check(weight.min() >= 0 and weight.max() <= 1, "mesh468_weight: values outside [0, 1]")


def save_face_model(model: FaceModel, path: str | Path) -> None:
    """Write `model` to an .npz atomically (temp file in the same folder, then rename). The bytes depend on the
    arrays alone (fixed zip timestamps, unlike np.savez), so DVC sees an unchanged model as unchanged; optional
    arrays at their defaults (_OPTIONAL) are not written, so an SFM or BFM file is byte for byte what it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as archive:
            for f in fields(model):
                if f.name in _OPTIONAL and np.array_equal(getattr(model, f.name), _OPTIONAL[f.name]()):
                    continue  # an optional array at its default is left out: the file stays as it was before
                info = zipfile.ZipInfo(f"{f.name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with archive.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(getattr(model, f.name)), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_face_model(path: str | Path) -> FaceModel:
    """Read and validate a face model .npz; FaceModelError says which key is missing, extra or malformed."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FaceModelError(f"{path}: no such face model file (run `dvc repro face_model`)") from None
    except Exception as err:  # zip/format errors come in many types
        raise FaceModelError(f"{path}: not a face model .npz ({err})") from None
    with data:
        names = {f.name for f in fields(FaceModel)}
        missing, extra = sorted(names - set(data.files) - set(_OPTIONAL)), sorted(set(data.files) - names)
        _check(not missing, f"{path}: missing arrays {missing} (an older face model format: rerun "
                            "`dvc repro face_model`)")
        _check(not extra, f"{path}: unexpected arrays {extra}")
        values = {k: (str(data[k]) if k in _STRINGS else data[k]) for k in names if k in data.files}
    try:
        return FaceModel(**values)
    except FaceModelError as err:
        raise FaceModelError(f"{path}: {err}") from None


def outward_winding(verts: np.ndarray, tris: np.ndarray) -> np.ndarray:
    """Flip all triangles if their normals point into the face: verts (V, 3), tris (F, 3) -> (F, 3).
    A face mesh is open, so 'outward' is judged by the summed normal pointing towards +z (the viewer)."""
    v0, v1, v2 = verts[tris[:, 0]], verts[tris[:, 1]], verts[tris[:, 2]]
    total = np.cross(v1 - v0, v2 - v0).sum(0)
    return tris if total[2] > 0 else tris[:, [0, 2, 1]].copy()
