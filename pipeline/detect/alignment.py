"""5-point similarity alignment of a photo to the fixed 224 x 224 crop template (docs/conventions.md).

The template is Deng et al.'s alignment target: the 5 mean 3D landmarks of bfm_aux/similarity_Lm3D_all.mat
(eye centres, nose tip, mouth corners) at 102 px per world unit, centred at pixel 112. A photo is aligned by the
similarity transform (uniform scale, rotation, translation; no reflection or shear) that maps its 5 detected
points onto the template with least squared error in crop px, so every crop-space result maps back to the
original photo through the inverse transform.
"""
from __future__ import annotations

import cv2
import numpy as np

CROP_SIZE_PX = 224
# (5, 2) crop px: right eye centre (image left), left eye centre (image right), nose tip, mouth corners L, R
TEMPLATE_5PT_PX = np.array([[80.23, 82.38], [143.60, 82.45], [112.33, 116.71], [86.28, 150.90], [137.34, 150.89]])

# iBUG-68 indices (0-based) of the 5 points
_EYE_IMAGE_LEFT = slice(36, 42)
_EYE_IMAGE_RIGHT = slice(42, 48)
_NOSE_TIP = 30
_MOUTH_IMAGE_LEFT = 48
_MOUTH_IMAGE_RIGHT = 54


def _check_points(name: str, points: np.ndarray, n: int | None = None) -> np.ndarray:
    points = np.asarray(points, np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or (n is not None and points.shape[0] != n):
        expected = f"({n}, 2)" if n is not None else "(N, 2)"
        raise ValueError(f"{name}: expected {expected} points, got {points.shape}")
    return points


def _check_transform(transform: np.ndarray) -> np.ndarray:
    transform = np.asarray(transform, np.float64)
    if transform.shape == (6,):
        transform = transform.reshape(2, 3)
    if transform.shape != (2, 3):
        raise ValueError(f"transform: expected (2, 3) (or 6 values, row-major), got {transform.shape}")
    return transform


def five_points(lmk68_px: np.ndarray) -> np.ndarray:
    """The alignment points of 68 iBUG landmarks, in TEMPLATE_5PT_PX order.

    lmk68_px: (68, 2) px. Returns (5, 2) float64 px: eye centres (mean of the 6 points of each eye), nose tip
    (30), mouth corners (48, 54).
    """
    lmk = _check_points("lmk68_px", lmk68_px, 68)
    return np.stack([lmk[_EYE_IMAGE_LEFT].mean(0), lmk[_EYE_IMAGE_RIGHT].mean(0), lmk[_NOSE_TIP],
                     lmk[_MOUTH_IMAGE_LEFT], lmk[_MOUTH_IMAGE_RIGHT]])


def fit_similarity(src_px: np.ndarray, dst_px: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform taking src points onto dst points.

    src_px, dst_px: (N, 2) corresponding points, N >= 2. Returns M (2, 3) float64 such that dst ~ M @ [x, y, 1],
    with M[:, :2] = [[a, -b], [b, a]] (scale sqrt(a^2 + b^2), no reflection): the linear least-squares solution
    of the 2N equations in (a, b, tx, ty).
    """
    src = _check_points("src_px", src_px)
    dst = _check_points("dst_px", dst_px, src.shape[0])
    if src.shape[0] < 2:
        raise ValueError(f"fit_similarity needs at least 2 point pairs, got {src.shape[0]}")
    x, y = src[:, 0], src[:, 1]
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    rows_x = np.stack([x, -y, ones, zeros], axis=1)   # u = a x - b y + tx
    rows_y = np.stack([y, x, zeros, ones], axis=1)    # v = b x + a y + ty
    system = np.concatenate([rows_x, rows_y])
    target = np.concatenate([dst[:, 0], dst[:, 1]])
    (a, b, tx, ty), *_ = np.linalg.lstsq(system, target, rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def transform_points(points_px: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine transform. points_px: (N, 2); transform: (2, 3) or its 6 values row-major.
    Returns (N, 2) float64 in the target space's px."""
    points = _check_points("points_px", points_px)
    m = _check_transform(transform)
    return points @ m[:, :2].T + m[:, 2]


def invert_transform(transform: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine transform (e.g. crop px -> original-photo px). Returns (2, 3) float64."""
    return cv2.invertAffineTransform(_check_transform(transform))


def transform_scale(transform: np.ndarray) -> float:
    """Uniform scale of a 2x3 similarity (target px per source px)."""
    return float(np.sqrt(abs(np.linalg.det(_check_transform(transform)[:, :2]))))


def warp_to_crop(rgb: np.ndarray, transform: np.ndarray, size_px: int = CROP_SIZE_PX) -> np.ndarray:
    """The crop `cv2.warpAffine(rgb, transform, (size_px, size_px))` (bilinear, black outside the photo), computed
    without aliasing when the face is shrunk: only the photo region that lands in the crop is used, and it is
    halved with cv2.pyrDown (Gaussian low-pass) while the scale is below 1/2, with the transform rescaled to match,
    so the geometry is exactly `transform`'s.

    rgb: (H, W, 3) uint8 photo; transform: (2, 3) photo px -> crop px. Returns (size_px, size_px, 3) uint8.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb: expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    m = _check_transform(transform).copy()
    scale = transform_scale(m)
    corners = np.array([[0, 0], [size_px - 1, 0], [0, size_px - 1], [size_px - 1, size_px - 1]], np.float64)
    in_photo = transform_points(corners, invert_transform(m))
    margin = 4.0 / min(scale, 1.0)  # room for the interpolation and pyramid kernels at the region's edge
    x0, y0 = np.maximum(np.floor(in_photo.min(0) - margin), 0).astype(int)
    x1, y1 = np.minimum(np.ceil(in_photo.max(0) + margin) + 1, (rgb.shape[1], rgb.shape[0])).astype(int)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((size_px, size_px, 3), np.uint8)
    region = rgb[y0:y1, x0:x1]
    m[:, 2] += m[:, :2] @ np.array([x0, y0], np.float64)  # photo px = region px + (x0, y0)
    while scale < 0.5 and min(region.shape[:2]) >= 2:
        region = cv2.pyrDown(region)  # pixel (i, j) of the half image sits at (2i, 2j) of the full one
        m[:, :2] *= 2.0
        scale *= 2.0
    return cv2.warpAffine(region, m, (size_px, size_px), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def box_to_crop(box_px: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """A face box mapped into the crop: (4,) left, top, right, bottom photo px -> (4,) float32 crop px, the box
    centre transformed and its size scaled (the similarity's rotation makes the face upright in the crop)."""
    box = np.asarray(box_px, np.float64)
    if box.shape != (4,):
        raise ValueError(f"box_px: expected (4,) left, top, right, bottom, got {box.shape}")
    centre = transform_points(((box[:2] + box[2:]) / 2)[None], transform)[0]
    half = (box[2:] - box[:2]) / 2 * transform_scale(transform)
    return np.concatenate([centre - half, centre + half]).astype(np.float32)
