"""dlib face detection (HOG, or the MMOD CNN) and the 68-point shape predictor.

The model files ship in the PyPI package face_recognition_models. Its __init__ imports pkg_resources, which
modern environments lack, so the package is located without being imported.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import cv2
import dlib
import numpy as np

from ..shards.tables import IBUG_FLIP

DETECTORS = ("hog", "cnn")
SHAPE_PREDICTOR_68 = "shape_predictor_68_face_landmarks.dat"
MMOD_DETECTOR = "mmod_human_face_detector.dat"


def dlib_model_file(name: str) -> Path:
    """Path of `name` in face_recognition_models/models/. Raises FileNotFoundError if absent."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the dlib models package is missing: pip install face_recognition_models")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise FileNotFoundError(f"dlib model file not found: {path}")
    return path


@functools.cache
def hog_detector() -> dlib.fhog_object_detector:
    """dlib's frontal-face HOG detector, loaded once per process."""
    return dlib.get_frontal_face_detector()


@functools.cache
def cnn_detector() -> dlib.cnn_face_detection_model_v1:
    """dlib's MMOD CNN face detector, loaded once per process."""
    return dlib.cnn_face_detection_model_v1(str(dlib_model_file(MMOD_DETECTOR)))


@functools.cache
def shape_predictor_68() -> dlib.shape_predictor:
    """dlib's 68-point (iBUG) shape predictor, loaded once per process."""
    return dlib.shape_predictor(str(dlib_model_file(SHAPE_PREDICTOR_68)))


@dataclass(frozen=True)
class Detection:
    """One detected face. box_px: (4,) float64 left, top, right, bottom in the photo's px (pixel centres at
    integer coordinates); score: HOG decision value, MMOD or BlazeFace confidence; detector: its name
    (pipeline.detect.faces.DETECTORS); keypoints_px: BlazeFace's (6, 2) photo px (eyes, nose tip, mouth centre,
    ear tragions; subject's right first), None for dlib's detectors."""
    box_px: np.ndarray
    score: float
    detector: str
    keypoints_px: np.ndarray | None = None

    @property
    def side_px(self) -> float:
        """Box size, px: the geometric mean of its width and height."""
        left, top, right, bottom = self.box_px
        return float(np.sqrt(max(right - left, 0.0) * max(bottom - top, 0.0)))


def _run_detector(rgb: np.ndarray, detector: str, upsample: int, min_score: float) -> list[tuple]:
    if detector == "hog":
        boxes, scores, _ = hog_detector().run(rgb, upsample, min_score)
        return [((b.left(), b.top(), b.right(), b.bottom()), s) for b, s in zip(boxes, scores)]
    found = cnn_detector()(rgb, upsample)
    return [((d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()), d.confidence)
            for d in found if d.confidence >= min_score]


def detect_faces(rgb: np.ndarray, detector: str = "hog", upsample: int = 1, min_score: float = 0.0,
                 max_side_px: int = 1600, fallback: bool = True) -> list[Detection]:
    """Faces in a photo, largest first.

    rgb: (H, W, 3) uint8 RGB. detector: "hog" (with the CNN, not upsampled, as fallback when HOG finds nothing
    and `fallback`) or "cnn".
    upsample: times the detector doubles the image (finds faces down to ~40 px at 1, ~80 px at 0).
    min_score: keep detections scoring at least this. max_side_px: photos larger than this are detected on a
    downscaled copy (boxes mapped back), which bounds the cost of huge photos without losing faces of a useful
    size. Returns detections with boxes in the photo's px.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb: expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if detector not in DETECTORS:
        raise ValueError(f"detector must be one of {DETECTORS}, got {detector!r}")
    scale = min(1.0, max_side_px / max(rgb.shape[:2]))
    small = rgb if scale == 1.0 else cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    name, found = detector, _run_detector(small, detector, upsample, min_score)
    if not found and detector == "hog" and fallback:
        # the fallback runs without upsampling (faces from ~80 px): each upsampling quadruples the CNN's cost,
        # already ~50x HOG's, and it runs on every photo without a face
        name, found = "cnn", _run_detector(small, "cnn", 0, min_score)
    # pixel centres: x_small = (x + 0.5) * scale - 0.5
    detections = [Detection((np.asarray(box, np.float64) + 0.5) / scale - 0.5, float(score), name)
                  for box, score in found]
    return sorted(detections, key=lambda d: -d.side_px)


def _predict(rgb: np.ndarray, box_px: np.ndarray) -> np.ndarray:
    """One pass of the shape predictor: (68, 2) float64 whole px (dlib rounds the box and its points)."""
    shape = shape_predictor_68()(rgb, dlib.rectangle(*(int(round(v)) for v in box_px)))
    return np.array([(p.x, p.y) for p in shape.parts()], np.float64)


def fit_landmarks(rgb: np.ndarray, box_px: np.ndarray, box_scales: tuple[float, ...] = (1.0,),
                  mirror: bool = False) -> np.ndarray:
    """68 iBUG landmarks fitted by dlib's shape predictor inside a face box, averaged over its passes.

    rgb: (H, W, 3) uint8 RGB; box_px: (4,) left, top, right, bottom in the same image's px; box_scales: one
    pass per factor, on the box scaled about its centre; mirror: each pass also on the horizontally mirrored
    image and box, its points mirrored back and relabelled (IBUG_FLIP). The defaults are dlib's single pass.
    Why several: one pass returns whole pixels, moves with the seed box and leans to one side; the mean of
    passes on mirrored images and rescaled boxes is sub-pixel and mirror-symmetric (measured in
    pipeline.detect.landmarks.LandmarkSettings).
    Returns (68, 2) float32, x right / y down, in the image's px.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb: expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    box = np.asarray(box_px, np.float64)
    if box.shape != (4,):
        raise ValueError(f"box_px: expected (4,) left, top, right, bottom, got {box.shape}")
    if not box_scales or min(box_scales) <= 0:
        raise ValueError(f"box_scales: expected one or more factors > 0, got {box_scales}")
    centre, half = (box[:2] + box[2:]) / 2, (box[2:] - box[:2]) / 2
    mirrored = np.ascontiguousarray(rgb[:, ::-1]) if mirror else None
    last_px = rgb.shape[1] - 1  # x -> last_px - x mirrors pixel centres
    passes = []
    for scale in box_scales:
        scaled = np.concatenate([centre - scale * half, centre + scale * half])
        passes.append(_predict(rgb, scaled))
        if mirror:
            back = _predict(mirrored, np.array([last_px - scaled[2], scaled[1], last_px - scaled[0], scaled[3]]))
            back[:, 0] = last_px - back[:, 0]
            passes.append(back[list(IBUG_FLIP)])
    return np.mean(passes, axis=0).astype(np.float32)
