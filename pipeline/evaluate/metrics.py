"""Standard reconstruction metrics: landmark NME, masked PSNR, Procrustes-aligned per-vertex error.

Pure numpy functions (masked_psnr also takes torch tensors, reduced on their device); spaces and units follow
docs/conventions.md (pixels with centres at integers, model space in mm).
"""
from __future__ import annotations

import numpy as np
import torch

ALIGN_MODES = ("rigid", "similarity")
INNER_POINTS = np.arange(17, 68)  # the 51 inner iBUG points (brows, nose, eyes, mouth), 0-based: all but the jaw


def check_shape(name: str, arr: np.ndarray, shape: tuple) -> None:
    """Raise ValueError naming `name` unless `arr` (numpy array) has `shape` (a None entry matches any size)."""
    if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{name}: expected shape {want}, got {arr.shape}")


def landmark_nme(pred_px: np.ndarray, gt_px: np.ndarray, points: np.ndarray | None = None) -> np.ndarray:
    """Normalised mean error of each face's landmarks (AFLW2000-3D convention).

    pred_px, gt_px: (N, K, 2) pixels (K = 68 for iBUG). The mean Euclidean point error of a face is divided by
    sqrt(w * h) of the bounding box of its ground-truth landmarks. points: indices of the landmarks to average
    over (e.g. INNER_POINTS); the box is still that of ALL K ground-truth points, as AFLW2000-3D normalises, so
    a subset's score is on the same scale as the full one. A face with a NaN prediction (a source that did not
    run) gets NaN. Returns (N,) float64, unitless.
    """
    pred_px, gt_px = np.asarray(pred_px, np.float64), np.asarray(gt_px, np.float64)
    check_shape("gt_px", gt_px, (None, None, 2))
    check_shape("pred_px", pred_px, gt_px.shape)
    extent = gt_px.max(axis=1) - gt_px.min(axis=1)
    box_size = np.sqrt(extent[:, 0] * extent[:, 1])
    if np.any(box_size <= 0):
        raise ValueError("gt_px: a face's landmarks have an empty bounding box (zero width or height)")
    error = np.linalg.norm(pred_px - gt_px, axis=-1)
    return (error if points is None else error[:, points]).mean(axis=1) / box_size


def masked_psnr(render, photo, mask) -> np.ndarray:
    """PSNR (N,) in dB of render vs photo over the masked pixels only.

    render, photo: (N, 3, H, W) in [0, 1]; mask: (N, 1, H, W) weights in [0, 1] (a pixel's squared error counts
    with its weight, in all three channels). All numpy arrays, or all torch tensors: tensors are reduced on their
    device and only the (N,) sums leave it. A face whose mask is empty gets NaN: there is nothing to measure.
    Per-pixel errors stay in the inputs' float type (no float64 copies of whole batches); numpy sums in float64,
    torch in the inputs' type with cascade summation (within 1e-6 of float64 on 224 x 224 renders, tested).
    """
    tensors = [isinstance(x, torch.Tensor) for x in (render, photo, mask)]
    if any(tensors) and not all(tensors):
        raise ValueError("render, photo, mask: expected all numpy arrays or all torch tensors, not a mix")
    if not all(tensors):
        render, photo, mask = (np.asarray(x) for x in (render, photo, mask))
    check_shape("photo", photo, (None, 3, None, None))
    check_shape("render", render, photo.shape)
    check_shape("mask", mask, (photo.shape[0], 1) + tuple(photo.shape[2:]))
    if all(tensors):  # a metric, never part of a graph
        with torch.no_grad():
            # One float32 reduction per face over its contiguous block (cascade summation, relative error
            # ~1e-7 log2 n); sum(dtype=float64) would first copy the whole batch to float64 (2x the PSNR's time).
            weight = mask.sum(dim=(1, 2, 3)).double().cpu().numpy() * 3
            sq_err = (render - photo).square_().mul_(mask).sum(dim=(1, 2, 3)).double().cpu().numpy()
    else:
        weight = mask.sum(axis=(1, 2, 3), dtype=np.float64) * 3
        sq_err = (np.square(render - photo) * mask).sum(axis=(1, 2, 3), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mse = np.where(weight > 0, sq_err / np.where(weight > 0, weight, 1.0), np.nan)
        # A perfect match is capped at 100 dB (MSE 1e-10) rather than reported as infinity.
        return np.where(weight > 0, 10 * np.log10(1.0 / np.maximum(mse, 1e-10)), np.nan)


def weighted_procrustes(src: np.ndarray, dst: np.ndarray, weights: np.ndarray,
                        mode: str = "rigid") -> tuple[float, np.ndarray, np.ndarray]:
    """Weighted least-squares alignment dst ~ s * R @ src + t (Umeyama 1991 with per-point weights).

    src, dst: (N, 3) in the same unit (mm); weights: (N,) >= 0, not all zero; mode 'rigid' (s = 1) or
    'similarity' (s fitted). Returns (s, R (3, 3) proper rotation, t (3,) in the unit of dst).
    """
    if mode not in ALIGN_MODES:
        raise ValueError(f"mode must be one of {ALIGN_MODES}, got {mode!r}")
    src, dst, weights = (np.asarray(x, np.float64) for x in (src, dst, weights))
    check_shape("src", src, (None, 3))
    check_shape("dst", dst, src.shape)
    check_shape("weights", weights, src.shape[:1])
    if np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError("weights: must be >= 0 with a positive sum")
    w = weights / weights.sum()
    mu_s, mu_d = w @ src, w @ dst
    a, b = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd((b * w[:, None]).T @ a)
    # Flipping the weakest axis when the best orthogonal map is a reflection keeps R a proper rotation.
    d = np.ones(3)
    d[-1] = np.sign(np.linalg.det(u @ vt)) or 1.0
    rot = u @ np.diag(d) @ vt
    scale = float((sig * d).sum() / (w @ (a ** 2).sum(1))) if mode == "similarity" else 1.0
    return scale, rot, mu_d - scale * rot @ mu_s


def aligned_vertex_error(pred_mm: np.ndarray, gt_mm: np.ndarray, weights: np.ndarray,
                         mode: str = "rigid") -> np.ndarray:
    """Per-vertex distance (V,) in mm after aligning pred onto gt by weighted Procrustes.

    pred_mm, gt_mm: (V, 3) meshes in vertex correspondence, mm; weights: (V,) alignment weights (the face
    region, e.g. FaceModel.face_region); mode: 'rigid' (rotation + translation) or 'similarity' (+ scale).
    Every vertex gets its error; `region_error_stats` summarises it over the same region.
    """
    scale, rot, t = weighted_procrustes(pred_mm, gt_mm, weights, mode)
    aligned = scale * np.asarray(pred_mm, np.float64) @ rot.T + t
    return np.linalg.norm(aligned - np.asarray(gt_mm, np.float64), axis=1)


def region_error_stats(err_mm: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """(weighted mean, weighted median) of a per-vertex error. err_mm: (V,) mm; weights: (V,) >= 0.

    The weighted median is the smallest error at which the cumulative weight reaches half the total weight: for
    0/1 weights, the mean over the region's vertices and their (lower, for an even count) median."""
    err_mm, weights = np.asarray(err_mm, np.float64), np.asarray(weights, np.float64)
    check_shape("err_mm", err_mm, (None,))
    check_shape("weights", weights, err_mm.shape)
    if np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError("weights: must be >= 0 with a positive sum")
    order = np.argsort(err_mm)
    cumulative = np.cumsum(weights[order])
    median = err_mm[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])]
    return float(weights @ err_mm / weights.sum()), float(median)
