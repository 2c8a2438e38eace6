"""Landmark-guided skin mask without a parsing network, in the spirit of Deng et al.'s skin attention.

Deng et al. weight the photometric loss by a skin probability from a Bayes classifier with Gaussian-mixture
colour models. Without a skin training set, both models are fitted per crop, on pixels whose class the
landmarks make near certain: skin from the inner cheeks and the nose, non-skin from outside the face outline.
Colours are compared in YCrCb chroma (Cr, Cb), which separates skin tones from most backgrounds and hair and is
fairly insensitive to shading. The non-skin density also holds a uniform share over the chroma plane: non-skin
is anything, so a colour seen in neither sample set (a sticker, a microphone) is not skin, instead of being
decided by whichever Gaussian tail happens to be wider. The posterior p(skin | colour) (equal priors) is then
kept inside the face outline (jaw + eyebrows lifted to cover the forehead), with the eye and mouth interiors cut
out and all edges feathered, giving soft 0..1 weights.
"""
from __future__ import annotations

import cv2
import numpy as np

from .gaussian_mixture import fit_gaussian_mixture_2d

JAW = np.arange(0, 17)
BROWS = np.arange(17, 27)
EYES = (np.arange(36, 42), np.arange(42, 48))
INNER_MOUTH = np.arange(60, 68)
# skin sample regions (iBUG indices): inner cheeks below the eyes, beside the nose, above the mouth corners
CHEEKS = (np.array([1, 2, 3, 48, 31, 40, 41]), np.array([15, 14, 13, 54, 35, 47, 46]))
NOSE = np.array([27, 31, 33, 35])
LOWER_JAW = np.arange(4, 13)

SUBPIXEL_BITS = 4  # cv2.fillPoly fixed-point shift: polygons at 1/16 px
_SKIN_COMPONENTS = 2
_BACKGROUND_COMPONENTS = 4
_SAMPLES_PER_CLASS = 1000
_CHROMA_VARIANCE_FLOOR = 4.0  # (chroma levels)^2 added to covariances: JPEG quantises chroma in steps of ~2
_SEED = 0  # per-crop sampling is seeded and the mixture fit deterministic: a crop always gets the same mask
_UNIFORM_SHARE = 0.1  # weight of the uniform density (1 / 256^2 per chroma level^2) in the non-skin model
_LOG_UNIFORM = np.log(_UNIFORM_SHARE) - 2 * np.log(256.0)


def _check_lmk(lmk_px: np.ndarray) -> np.ndarray:
    lmk = np.asarray(lmk_px, np.float64)
    if lmk.shape != (68, 2):
        raise ValueError(f"lmk_px: expected (68, 2) crop px, got {lmk.shape}")
    return lmk


def polygons_mask(polygons: list[np.ndarray], size_px: int) -> np.ndarray:
    """Filled polygons as a (size_px, size_px) bool mask. polygons: each (N, 2) float px."""
    canvas = np.zeros((size_px, size_px), np.uint8)
    fixed = [np.round(p * (1 << SUBPIXEL_BITS)).astype(np.int32) for p in polygons]
    cv2.fillPoly(canvas, fixed, 1, lineType=cv2.LINE_8, shift=SUBPIXEL_BITS)
    return canvas.astype(bool)


def face_outline_px(lmk_px: np.ndarray, forehead_lift: float) -> np.ndarray:
    """The face outline polygon: the jaw (0..16) then the eyebrows (26..17) moved up by forehead_lift times the
    nose-bridge-to-chin distance (27 -> 8), along the chin-to-brows direction, to take in the forehead.
    lmk_px: (68, 2) crop px. Returns (27, 2) float64 crop px."""
    lmk = _check_lmk(lmk_px)
    up = lmk[BROWS].mean(0) - lmk[8]
    up /= max(np.linalg.norm(up), 1e-6)
    lift = forehead_lift * np.linalg.norm(lmk[27] - lmk[8])
    return np.concatenate([lmk[JAW], lmk[BROWS[::-1]] + lift * up])


def _shrink(polygon: np.ndarray, factor: float = 0.7) -> np.ndarray:
    # the cheek polygons touch the jaw and the nose; shrinking keeps beard shadows and nostrils out of the samples
    centre = polygon.mean(0)
    return centre + factor * (polygon - centre)


def face_regions(lmk_px: np.ndarray, size_px: int, forehead_lift: float) -> dict[str, np.ndarray]:
    """Landmark-defined regions of a crop, each (size_px, size_px) bool: 'face' (outline), 'holes' (eyes and
    inner mouth, slightly grown), 'skin_samples' (inner cheeks and nose), 'near_face' (the outline grown by 6%
    of the crop), 'background_samples' (outside near_face and not the neck below the chin, whose skin would
    teach the background model skin colours)."""
    lmk = _check_lmk(lmk_px)
    face = polygons_mask([face_outline_px(lmk, forehead_lift)], size_px)
    holes = polygons_mask([lmk[EYES[0]], lmk[EYES[1]], lmk[INNER_MOUTH]], size_px)
    holes = cv2.dilate(holes.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    skin = polygons_mask([_shrink(lmk[CHEEKS[0]]), _shrink(lmk[CHEEKS[1]]), lmk[NOSE]], size_px) & ~holes
    grow = max(3, int(round(0.06 * size_px)))
    near = cv2.dilate(face.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1,) * 2))
    near = near.astype(bool)
    neck = polygons_mask([np.concatenate([lmk[LOWER_JAW], lmk[LOWER_JAW[::-1]] + [0.0, size_px]])], size_px)
    return {"face": face, "holes": holes, "skin_samples": skin, "near_face": near,
            "background_samples": ~near & ~neck}


def chroma(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 2) uint8 YCrCb chroma (Cr, Cb)."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)[..., 1:]


def skin_posterior(rgb: np.ndarray, skin_samples: np.ndarray, background_samples: np.ndarray,
                   where: np.ndarray) -> np.ndarray:
    """p(skin | chroma), equal priors, from Gaussian mixtures fitted on the two sample sets (the non-skin one
    mixed with a uniform density), at the pixels of `where` (0 elsewhere).

    rgb: (H, W, 3) uint8; skin_samples, background_samples, where: (H, W) bool. Returns (H, W) float32 in
    [0, 1]; 0.5 over `where` when either sample set is empty (no evidence either way).
    """
    if not skin_samples.shape == background_samples.shape == where.shape == rgb.shape[:2]:
        raise ValueError(f"masks {skin_samples.shape}, {background_samples.shape}, {where.shape} do not match the "
                         f"image {rgb.shape[:2]}")
    posterior = np.zeros(rgb.shape[:2], np.float32)
    if not skin_samples.any() or not background_samples.any():
        posterior[where] = 0.5
        return posterior
    features = chroma(rgb)
    rng = np.random.default_rng(_SEED)

    def sample(region):
        pixels = features[region]
        return pixels[rng.choice(len(pixels), min(len(pixels), _SAMPLES_PER_CLASS), replace=False)].astype(float)

    # chroma is 8-bit: a face holds a few thousand distinct (Cr, Cb) pairs, so each is scored once
    codes = features[where].astype(np.int32) @ np.array([256, 1], np.int32)
    distinct, pixel_to_distinct = np.unique(codes, return_inverse=True)
    colours = np.stack([distinct // 256, distinct % 256], axis=1).astype(float)
    skin_points, background_points = sample(skin_samples), sample(background_samples)
    skin = fit_gaussian_mixture_2d(skin_points, min(_SKIN_COMPONENTS, len(skin_points)), _CHROMA_VARIANCE_FLOOR)
    background = fit_gaussian_mixture_2d(background_points, min(_BACKGROUND_COMPONENTS, len(background_points)),
                                         _CHROMA_VARIANCE_FLOOR)
    log_background = np.logaddexp(np.log1p(-_UNIFORM_SHARE) + background.log_density(colours), _LOG_UNIFORM)
    log_ratio = skin.log_density(colours) - log_background
    posterior[where] = (1.0 / (1.0 + np.exp(-np.clip(log_ratio, -50, 50))))[pixel_to_distinct]
    return posterior


def skin_mask(crop_rgb: np.ndarray, lmk_px: np.ndarray, forehead_lift: float = 0.3,
              feather_px: float = 2.0) -> np.ndarray:
    """Soft face-skin weights of an aligned crop.

    crop_rgb: (S, S, 3) uint8 RGB; lmk_px: (68, 2) crop px; forehead_lift: how far above the eyebrows the face
    outline reaches, as a fraction of the nose-bridge-to-chin distance; feather_px: Gaussian sigma, px, that
    softens the outline and hole edges. Returns (S, S) float32 in [0, 1]: the skin posterior inside the face
    outline, 0 in the eyes and the open mouth and outside the face.
    """
    if crop_rgb.ndim != 3 or crop_rgb.shape[2] != 3 or crop_rgb.shape[0] != crop_rgb.shape[1]:
        raise ValueError(f"crop_rgb: expected (S, S, 3), got {crop_rgb.shape}")
    regions = face_regions(lmk_px, crop_rgb.shape[0], forehead_lift)
    posterior = skin_posterior(crop_rgb, regions["skin_samples"], regions["background_samples"],
                               regions["near_face"])
    return feather((regions["face"] & ~regions["holes"]).astype(np.float32), posterior, feather_px)


def feather(inside: np.ndarray, weights: np.ndarray, feather_px: float) -> np.ndarray:
    """Soft mask `weights` x `inside` with feathered edges: inside (S, S) float32 {0, 1} blurred by feather_px
    (Gaussian sigma, px) and kept inside only, so weights fall to 0 at the outline, not beyond it; weights (S, S)
    float32 in [0, 1] blurred by half as much. feather_px 0: no blur. Returns (S, S) float32 in [0, 1]."""
    if feather_px > 0:
        inside = cv2.GaussianBlur(inside, (0, 0), feather_px) * inside
        weights = cv2.GaussianBlur(weights, (0, 0), feather_px / 2)
    return (weights * inside).clip(0.0, 1.0)
