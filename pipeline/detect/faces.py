"""Face detection as a chain of detectors: the first that finds a face in a photo gives that photo's faces.

BlazeFace (MediaPipe, pipeline.detect.mediapipe) finds faces at every yaw, profiles included, where dlib's HOG
detector misses most faces beyond ~45 deg; dlib's HOG and MMOD CNN detectors stay in the chain for photos that
BlazeFace misses. Each detection records its detector and score.
"""
from __future__ import annotations

import numpy as np

from .dlib_faces import Detection, detect_faces
from .mediapipe import BLAZEFACE, detect_blazeface

DLIB_DETECTORS = ("hog", "cnn")
DETECTORS = tuple(BLAZEFACE) + DLIB_DETECTORS


def detect_chain(rgb: np.ndarray, detectors: tuple[str, ...], upsample: int = 1, min_score: float = 0.0,
                 blazeface_min_score: float = 0.5, max_side_px: int = 1600) -> list[Detection]:
    """The faces of the first detector in `detectors` that finds any, largest first.

    rgb: (H, W, 3) uint8; detectors: names from DETECTORS, tried in order; upsample, min_score, max_side_px: dlib's
    (see dlib_faces.detect_faces; the CNN after HOG runs without upsampling, as dlib's own fallback does);
    blazeface_min_score: BlazeFace's confidence threshold in [0, 1]. Returns [] when none finds a face.
    """
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown or not detectors:
        raise ValueError(f"detectors must be a non-empty list of {DETECTORS}, got {list(detectors)}")
    for name in detectors:
        if name in BLAZEFACE:
            found = [Detection(f.box_px, f.score, name, f.keypoints_px)
                     for f in detect_blazeface(rgb, name, blazeface_min_score)]
        else:
            cnn_after_hog = name == "cnn" and "hog" in detectors[:detectors.index(name)]
            found = detect_faces(rgb, name, 0 if cnn_after_hog else upsample, min_score, max_side_px, fallback=False)
        if found:
            return sorted(found, key=lambda d: -d.side_px)
    return []
