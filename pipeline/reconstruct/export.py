"""Per-face user outputs: landmarks mapped back to the photo, overlays on the original photo, annotated crops,
photo-textured vertex colours."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

OVERLAY_ALPHA = 0.65


def crop_to_photo_px(pts_crop_px: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Map crop pixels back to the original photo. pts_crop_px: (N, 2); transform: (2, 3) photo px -> crop px
    (the crop's similarity). Returns (N, 2) photo px."""
    transform = np.asarray(transform, np.float64).reshape(2, 3)
    inverse = cv2.invertAffineTransform(transform)
    return np.asarray(pts_crop_px, np.float64) @ inverse[:, :2].T + inverse[:, 2]


def overlay_on_photo(photo_rgb: np.ndarray, render_rgb: np.ndarray, render_mask: np.ndarray,
                     transform: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Composite a crop-space render onto the ORIGINAL photo through the crop transform.

    photo_rgb: (H, W, 3) uint8; render_rgb: (S, S, 3) float in [0, 1]; render_mask: (S, S) float coverage;
    transform: (2, 3) photo px -> crop px. Returns (H, W, 3) uint8.
    """
    h, w = photo_rgb.shape[:2]
    m = np.asarray(transform, np.float64).reshape(2, 3)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP  # m maps photo -> crop, i.e. destination -> source here
    render = cv2.warpAffine(render_rgb.astype(np.float32), m, (w, h), flags=flags)
    cover = cv2.warpAffine(render_mask.astype(np.float32), m, (w, h), flags=flags)[..., None] * alpha
    out = photo_rgb.astype(np.float32) / 255.0 * (1 - cover) + np.clip(render, 0, 1) * cover
    return (out * 255 + 0.5).astype(np.uint8)


def draw_landmarks(crop_rgb: np.ndarray, lmk_detected_px: np.ndarray, lmk_fitted_px: np.ndarray) -> np.ndarray:
    """crop_rgb: (S, S, 3) uint8; landmarks (68, 2) crop px. Detected in green, the model's projection in red."""
    out = crop_rgb.copy()
    for pts, colour in ((lmk_detected_px, (40, 220, 40)), (lmk_fitted_px, (235, 40, 40))):
        for x, y in np.asarray(pts, np.float64):
            cv2.circle(out, (int(round(x)), int(round(y))), 2, colour, -1, lineType=cv2.LINE_AA)
    return out


def photo_vertex_colors(crop_rgb: np.ndarray, verts_px: np.ndarray, visible: np.ndarray,
                        model_colors: np.ndarray) -> np.ndarray:
    """Texture a mesh from its photo: crop_rgb (S, S, 3) uint8; verts_px (V, 3) crop px + depth; visible (V,) bool;
    model_colors (V, 3) in [0, 1] used where the vertex is hidden. Returns (V, 3) float in [0, 1]."""
    s = crop_rgb.shape[0]
    xy = np.clip(np.rint(verts_px[:, :2]).astype(np.int64), 0, s - 1)
    sampled = crop_rgb[xy[:, 1], xy[:, 0]].astype(np.float32) / 255.0
    return np.where(visible[:, None], sampled, np.clip(model_colors, 0, 1)).astype(np.float32)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """rgb: (H, W, 3) uint8 -> PNG at `path` (parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
