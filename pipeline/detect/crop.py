"""Photos -> aligned 224 x 224 face crops (the `crop` stage): decode, detect (a chain of detectors), run the
468-point face mesh, align on 5 points of its 68 iBUG landmarks."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..shards.accounting import Rejected, StageReport, reject_row
from ..shards.image_bytes import encode_jpeg
from ..shards.stage_run import run_stage
from ..shards.tables import CROPS_SCHEMA
from .alignment import (CROP_SIZE_PX, TEMPLATE_5PT_PX, box_to_crop, fit_similarity, five_points, transform_points,
                        transform_scale, warp_to_crop)
from .dlib_faces import Detection, fit_landmarks
from .faces import DETECTORS, detect_chain
from .mediapipe import Roi, face_mesh, roi_around
from .mesh68 import mesh_to_ibug68
from .photo_io import read_photo

STAGE = "crop"
NO_FACE = "no face"
FACE_TOO_SMALL = "face too small"
MULTI_FACE = ("largest", "all")
MESH_RETRY_SCORE = 0.9  # a first mesh less confident than this is also run from an upright ROI (photo_mesh)


@dataclass(frozen=True)
class CropSettings:
    """The `crop` params. detectors: the detection chain (faces.DETECTORS, first to find a face wins);
    multi_face: "largest" | "all"; upsample: dlib's upsampling; min_score: dlib's detection score threshold;
    blazeface_min_score: BlazeFace's, in [0, 1]; mesh_passes: face-mesh passes (the second re-crops from the
    first); min_face_px: smallest face box side kept, photo px (smaller photos are refused outright); max_pixels:
    larger photos are refused from their header; detect_max_side_px: dlib detects on a copy downscaled to this
    longest side; jpeg_quality: of the stored crops."""
    detectors: tuple[str, ...] = ("blazeface_full", "blazeface_short", "hog", "cnn")
    multi_face: str = "largest"
    upsample: int = 1
    min_score: float = 0.0
    blazeface_min_score: float = 0.5
    mesh_passes: int = 2
    min_face_px: int = 64
    max_pixels: int = 40_000_000
    detect_max_side_px: int = 1600
    jpeg_quality: int = 95

    def __post_init__(self):
        object.__setattr__(self, "detectors", tuple(self.detectors))
        if not self.detectors or any(d not in DETECTORS for d in self.detectors):
            raise ValueError(f"crop.detectors must be a non-empty list of {DETECTORS}, got {list(self.detectors)}")
        if not 0.0 <= self.blazeface_min_score <= 1.0:
            raise ValueError(f"crop.blazeface_min_score must be in [0, 1], got {self.blazeface_min_score}")
        if self.mesh_passes < 1:
            raise ValueError(f"crop.mesh_passes must be >= 1, got {self.mesh_passes}")
        if self.multi_face not in MULTI_FACE:
            raise ValueError(f"crop.multi_face must be one of {MULTI_FACE}, got {self.multi_face!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"crop.jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if min(self.upsample, self.min_face_px, self.max_pixels, self.detect_max_side_px) < 0:
            raise ValueError(f"crop sizes must be >= 0, got {self}")


def face_id(photo_key: str, face_index: int) -> str:
    """Stable face id: '<photo path relative to the input folder>#<face index>'."""
    return f"{photo_key}#{face_index}"


def photo_key(path: Path, root: Path | None) -> str:
    """The photo part of face ids: its path relative to `root` (posix), or the path as given without a root."""
    return path.relative_to(root).as_posix() if root is not None else path.as_posix()


def select_faces(detections: list[Detection], settings: CropSettings) -> list[Detection]:
    """The detections to crop, largest first: at least min_face_px, the largest only or all of them.
    Raises Rejected 'no face' / 'face too small' when none is left."""
    if not detections:
        raise Rejected(NO_FACE, f"no detection by {', '.join(settings.detectors)}")
    large = [d for d in detections if d.side_px >= settings.min_face_px]
    if not large:
        raise Rejected(FACE_TOO_SMALL, f"largest face {detections[0].side_px:.0f} px < {settings.min_face_px} px")
    return large[:1] if settings.multi_face == "largest" else large


def photo_mesh(rgb: np.ndarray, detection: Detection, passes: int) -> tuple[np.ndarray, float]:
    """The 468-point face mesh of a detected face: (mesh_px (468, 3) float64 photo px, score in [0, 1]).
    The first ROI's rotation comes from the detection's eyes (BlazeFace's keypoints, or dlib's 68 points for
    dlib's boxes). On a turned head those eye points can tilt the ROI far off (a synthetic face at 53 deg yaw: a
    46 deg tilt, mesh score 0.73 and 15 % NME; from an upright ROI 1.00 and 7 %), so a mesh scoring below
    MESH_RETRY_SCORE is run again from an upright ROI and the more confident of the two is kept. Confident
    meshes are kept as they are: near-frontal faces score ~1.0 either way and a coin toss between two
    equally good meshes would only move their crops."""
    if detection.keypoints_px is not None:
        eye_right, eye_left = detection.keypoints_px[0], detection.keypoints_px[1]
    else:
        eye_right, eye_left = five_points(fit_landmarks(rgb, detection.box_px))[:2]
    tilted = roi_around(detection.box_px, eye_right, eye_left)
    mesh, score = face_mesh(rgb, tilted, passes)
    if score >= MESH_RETRY_SCORE:
        return mesh, score
    upright = face_mesh(rgb, Roi(tilted.centre_px, tilted.side_px, 0.0), passes)
    return upright if upright[1] > score else (mesh, score)


def align_face(rgb: np.ndarray, detection: Detection, mesh_passes: int = 2) -> tuple[np.ndarray, np.ndarray,
                                                                                          np.ndarray, float]:
    """Align one detected face on the 5 points of its mesh's 68 landmarks. rgb: (H, W, 3) uint8 photo.
    Returns the crop (224, 224, 3) uint8, the transform (2, 3) float64 photo px -> crop px, the mesh in crop px
    (468, 3) float64 (x, y and z scaled by the transform) and the mesh score in [0, 1]."""
    mesh_photo, score = photo_mesh(rgb, detection, mesh_passes)
    transform = fit_similarity(five_points(mesh_to_ibug68(mesh_photo)), TEMPLATE_5PT_PX)
    mesh_crop = np.concatenate([transform_points(mesh_photo[:, :2], transform),
                                mesh_photo[:, 2:] * transform_scale(transform)], axis=1)
    return warp_to_crop(rgb, transform, CROP_SIZE_PX), transform, mesh_crop, score


def crop_photo(path: str | Path, settings: CropSettings, root: str | Path | None = None) -> list[dict]:
    """The face crops of one photo, as rows of CROPS_SCHEMA (id, source, face_index, crop JPEG bytes, transform
    6 values photo px -> crop px, box_crop (4,) crop px, mesh (468 x 3) crop px, mesh_score, score, detector,
    width, height in photo px).

    root: the input folder that face ids are relative to (None: ids use the path as given).
    Raises Rejected (bad file, no face, face too small).
    """
    path = Path(path)
    rgb = read_photo(path, settings.max_pixels, min_side_px=settings.min_face_px)
    found = detect_chain(rgb, settings.detectors, settings.upsample, settings.min_score,
                         settings.blazeface_min_score, settings.detect_max_side_px)
    key = photo_key(path, Path(root) if root is not None else None)
    rows = []
    for index, detection in enumerate(select_faces(found, settings)):
        crop, transform, mesh, mesh_score = align_face(rgb, detection, settings.mesh_passes)
        rows.append({
            "id": face_id(key, index), "source": str(path), "face_index": index,
            "crop": encode_jpeg(crop, settings.jpeg_quality), "transform": transform.reshape(-1),
            "box_crop": box_to_crop(detection.box_px, transform), "mesh": mesh.astype(np.float32).reshape(-1),
            "mesh_score": mesh_score, "score": detection.score, "detector": detection.detector,
            "width": rgb.shape[1], "height": rgb.shape[0]})
    return rows


def crop_task(path: Path, settings: CropSettings, root: Path | None) -> tuple[list[dict], list[dict]]:
    """crop_photo as a stage task: (crop rows, []) or ([], [the photo's reject row]); never raises."""
    try:
        return crop_photo(path, settings, root), []
    except Exception as error:  # noqa: BLE001 - a bad photo becomes a reject row, never a crashed run
        return [], [reject_row(str(path), STAGE, error)]


def run_crop(photos: list[Path], root: Path | None, settings: CropSettings, workers: int, crops_path: Path,
             rejects_path: Path) -> StageReport:
    """The `crop` stage over `photos`: writes the crops table (CROPS_SCHEMA) and its rejects (REJECTS_SCHEMA),
    both atomically, and returns the stage report (inputs = photos, outputs = faces). Every photo ends up with
    at least one crop or one reject row."""
    task = functools.partial(crop_task, settings=settings, root=root)
    return run_stage(STAGE, task, photos, len(photos), workers, 1, crops_path, CROPS_SCHEMA, rejects_path)
