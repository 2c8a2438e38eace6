"""Aligned crops -> the 68 landmarks the reconstruction fits, in crop px (the `landmarks` stage).

Two sources: dlib's shape predictor fitted on the upright, normalised crop, and the 468-point face mesh of the
crop stage mapped to the 68 points (mesh68). `LandmarkSettings.source` chooses: "dlib", "mesh", or "fused"
(default): dlib's points, which are the more precise on near-frontal photos, unless they disagree with the mesh's
by more than `fuse_max_disagreement` (NME), as they do when dlib's predictor fails on a turned or occluded face
(20-30 % NME), or the mesh says the head is turned further than `profile_yaw_deg` (mediapipe.mesh_yaw_deg),
where dlib's predictor, trained on near-frontal faces, fails even when the two still agree; then the mesh's
points. dlib's predictor is seeded by the detection box mapped into the crop for dlib's own detections; for others
by the box of dlib's HOG detector run on the crop itself (the predictor was trained on such boxes: BlazeFace's are
framed differently, and a fixed box misplaces turned faces), or DLIB_BOX_CROP_PX, where HOG boxes land on aligned
crops, when HOG finds no face there. A chosen set whose 5 alignment points land far from the template reveals a
false or badly fitted detection, and the face is rejected.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..shards.accounting import Rejected, StageReport, reject_row
from ..shards.image_bytes import decode_rgb
from ..shards.stage_run import run_stage
from ..shards.ranks import RankShare, photo_of
from ..shards.tables import LANDMARKS_SCHEMA, N_MESH, iter_rows
from .alignment import TEMPLATE_5PT_PX, five_points
from .dlib_faces import detect_faces, fit_landmarks
from .faces import DLIB_DETECTORS
from .mediapipe import box_iou, mesh_yaw_deg
from .mesh68 import mesh_to_ibug68

STAGE = "landmarks"
OFF_TEMPLATE = "landmarks off template"
SOURCES = ("dlib", "mesh", "fused")
# mean HOG box of the 28 sample photos' aligned crops (std 8-10 px): left, top, right, bottom crop px
DLIB_BOX_CROP_PX = np.array([35.0, 36.0, 187.0, 188.0])


@dataclass(frozen=True)
class LandmarkSettings:
    """The `landmarks` params. source: "dlib" | "mesh" | "fused" (see the module doc); fuse_max_disagreement:
    fused takes the mesh's points when dlib's differ from them by more than this NME (mean distance over the
    sqrt(w h) of their box); min_mesh_score: below this face-mesh confidence that disagreement is not trusted
    (a mesh without a face); profile_yaw_deg: fused takes the mesh's points when its yaw (mesh_yaw_deg) is
    beyond this, whatever its confidence, which falls at profiles (90 = never); max_template_px: reject a face
    whose chosen 5 points are further than this from the template on average, crop px; dlib_box_scales,
    dlib_mirror: dlib's points are the mean of its passes on the seed box scaled by each factor, each also on the
    mirrored crop (dlib_faces.fit_landmarks).

    The mean of 6 passes (scales 0.95, 1, 1.05, each mirrored) against one pass, inner-51 NME of dlib's points
    (scripts/dlib_passes.py, on the pipeline's crops): annotated photos 2.05 -> 1.69 % (each of the four better:
    breakingbad 2.34 -> 1.38, einstein 3.00 -> 2.70, image_0010 1.14 -> 0.96, takeo 1.75 -> 1.71), synthetic
    renders 8.90 -> 8.77 %. Mirrored alone: 1.78 / 8.83; 3 scales alone: 1.82 / 8.82; 5 scales (0.9-1.1),
    mirrored: 1.75 / 8.69."""
    source: str = "fused"
    fuse_max_disagreement: float = 0.08
    min_mesh_score: float = 0.5
    profile_yaw_deg: float = 40.0
    max_template_px: float = 12.0
    dlib_box_scales: tuple[float, ...] = (0.95, 1.0, 1.05)
    dlib_mirror: bool = True

    def __post_init__(self):
        object.__setattr__(self, "dlib_box_scales", tuple(float(v) for v in self.dlib_box_scales))
        if not self.dlib_box_scales or not all(0.5 <= v <= 2.0 for v in self.dlib_box_scales):
            raise ValueError(f"landmarks.dlib_box_scales must be one or more factors in [0.5, 2], "
                             f"got {self.dlib_box_scales}")
        if not isinstance(self.dlib_mirror, bool):
            raise ValueError(f"landmarks.dlib_mirror must be true or false, got {self.dlib_mirror!r}")
        if self.source not in SOURCES:
            raise ValueError(f"landmarks.source must be one of {SOURCES}, got {self.source!r}")
        if self.fuse_max_disagreement <= 0:
            raise ValueError(f"landmarks.fuse_max_disagreement must be > 0, got {self.fuse_max_disagreement}")
        if not 0.0 <= self.min_mesh_score <= 1.0:
            raise ValueError(f"landmarks.min_mesh_score must be in [0, 1], got {self.min_mesh_score}")
        if not 0.0 <= self.profile_yaw_deg <= 90.0:
            raise ValueError(f"landmarks.profile_yaw_deg must be in [0, 90], got {self.profile_yaw_deg}")
        if self.max_template_px <= 0:
            raise ValueError(f"landmarks.max_template_px must be > 0, got {self.max_template_px}")


def point_set_nme(a_px: np.ndarray, b_px: np.ndarray) -> float:
    """Mean distance between two (68, 2) point sets over sqrt(w h) of b's box (the NME of a against b)."""
    extent = b_px.max(0) - b_px.min(0)
    return float(np.linalg.norm(a_px - b_px, axis=1).mean() / max(np.sqrt(extent[0] * extent[1]), 1e-9))


def choose_landmarks(dlib_px: np.ndarray, mesh68_px: np.ndarray, mesh_score: float, yaw_deg: float,
                     settings: LandmarkSettings) -> tuple[np.ndarray, str]:
    """The 68 points to fit and their source name ("dlib" | "mesh"). dlib_px, mesh68_px: (68, 2) crop px;
    mesh_score: the mesh's confidence in [0, 1]; yaw_deg: its yaw (mediapipe.mesh_yaw_deg)."""
    if settings.source == "fused":
        profile = abs(yaw_deg) > settings.profile_yaw_deg
        disagree = (mesh_score >= settings.min_mesh_score
                    and point_set_nme(dlib_px, mesh68_px) > settings.fuse_max_disagreement)
        return (mesh68_px, "mesh") if profile or disagree else (dlib_px, "dlib")
    return (dlib_px, "dlib") if settings.source == "dlib" else (mesh68_px, "mesh")


def template_error_px(lmk_crop_px: np.ndarray) -> float:
    """Mean distance, crop px, of the 5 alignment points of (68, 2) crop landmarks from TEMPLATE_5PT_PX."""
    return float(np.linalg.norm(five_points(lmk_crop_px) - TEMPLATE_5PT_PX, axis=1).mean())


def crop_landmarks(crop_rgb: np.ndarray, dlib_box_crop_px: np.ndarray, mesh_crop_px: np.ndarray, mesh_score: float,
                   settings: LandmarkSettings) -> tuple[np.ndarray, np.ndarray, str]:
    """The 68 landmarks of an aligned crop. crop_rgb: (224, 224, 3) uint8; dlib_box_crop_px: (4,) the box that seeds
    dlib's predictor, crop px; mesh_crop_px: (468, 3) crop px; mesh_score: its confidence.
    Returns (chosen (68, 2) float32 crop px, dlib's (68, 2) float32 crop px, source name).
    Raises Rejected 'landmarks off template'."""
    dlib_px = fit_landmarks(crop_rgb, dlib_box_crop_px, settings.dlib_box_scales, settings.dlib_mirror)
    chosen, source = choose_landmarks(dlib_px.astype(np.float64), mesh_to_ibug68(mesh_crop_px), mesh_score,
                                      mesh_yaw_deg(mesh_crop_px), settings)
    error = template_error_px(chosen)
    if error > settings.max_template_px:
        raise Rejected(OFF_TEMPLATE, f"5 points of the {source} landmarks {error:.1f} px from the template > "
                                     f"{settings.max_template_px}")
    return chosen.astype(np.float32), dlib_px, source


def dlib_box_crop(row: dict, crop_rgb: np.ndarray) -> np.ndarray:
    """The box (4,) crop px seeding dlib's predictor on a crops-table row: its detection box for dlib's detectors;
    else the HOG box found on the crop that overlaps DLIB_BOX_CROP_PX most (IoU > 0.3), else DLIB_BOX_CROP_PX."""
    if row["detector"] in DLIB_DETECTORS:
        return np.asarray(row["box_crop"], np.float64)
    found = [d.box_px for d in detect_faces(crop_rgb, "hog", upsample=1, fallback=False)]
    if not found:
        return DLIB_BOX_CROP_PX
    overlap = box_iou(DLIB_BOX_CROP_PX, np.stack(found))
    best = int(np.argmax(overlap))
    return found[best] if overlap[best] > 0.3 else DLIB_BOX_CROP_PX


def landmarks_task(row: dict, settings: LandmarkSettings) -> tuple[list[dict], list[dict]]:
    """crop_landmarks on a crops-table row (id, source, crop, box_crop, detector, mesh, mesh_score, score) as a
    stage task: ([{id, landmarks, dlib_landmarks (136,) float32 crop px, landmarks_source, score}], []) or
    ([], [the face's reject row]); never raises."""
    try:
        mesh = np.asarray(row["mesh"], np.float64).reshape(N_MESH, 3)
        crop = decode_rgb(row["crop"])
        chosen, dlib_px, source = crop_landmarks(crop, dlib_box_crop(row, crop), mesh, float(row["mesh_score"]),
                                                 settings)
    except Exception as error:  # noqa: BLE001 - a bad face becomes a reject row, never a crashed run
        return [], [reject_row(row["source"], STAGE, error, row["id"])]
    return [{"id": row["id"], "landmarks": chosen.reshape(-1), "dlib_landmarks": dlib_px.reshape(-1),
             "landmarks_source": source, "score": row["score"]}], []


def run_landmarks(crops_path: Path, settings: LandmarkSettings, workers: int, landmarks_path: Path,
                  rejects_path: Path, share: RankShare = RankShare()) -> StageReport:
    """The `landmarks` stage: crops table -> landmarks table (LANDMARKS_SCHEMA, in crop order) and its rejects,
    over the faces of this rank's photos (`share`; all of them in one process). Returns the stage report
    (inputs = outputs + rejects = faces)."""
    columns = ["id", "source", "crop", "box_crop", "detector", "mesh", "mesh_score", "score"]
    crops = (row for row in iter_rows(crops_path, columns=columns) if share.takes(photo_of(row["id"])))
    task = functools.partial(landmarks_task, settings=settings)
    return run_stage(STAGE, task, crops, share.count(crops_path), workers, 64, landmarks_path, LANDMARKS_SCHEMA,
                     rejects_path)
