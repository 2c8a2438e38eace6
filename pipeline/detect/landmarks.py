"""Aligned crops -> 68 landmarks re-fitted in crop px (the `landmarks` stage).

The photo landmarks only served to align; fitting again on the upright, normalised crop is what the
reconstruction's landmark loss uses. The detection box mapped into the crop seeds the shape predictor, so no
second detection can fail. A re-fit whose 5 alignment points land far from the template reveals a false or
badly fitted detection, and the face is rejected.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..shards.accounting import Rejected, StageReport, reject_row
from ..shards.image_bytes import decode_rgb
from ..shards.stage_run import run_stage
from ..shards.tables import LANDMARKS_SCHEMA, count_rows, iter_rows
from .alignment import TEMPLATE_5PT_PX, five_points
from .dlib_faces import fit_landmarks

STAGE = "landmarks"
OFF_TEMPLATE = "landmarks off template"


@dataclass(frozen=True)
class LandmarkSettings:
    """The `landmarks` params. max_template_px: reject a face whose re-fitted 5 points are further than this
    from the template on average, crop px."""
    max_template_px: float = 12.0

    def __post_init__(self):
        if self.max_template_px <= 0:
            raise ValueError(f"landmarks.max_template_px must be > 0, got {self.max_template_px}")


def template_error_px(lmk_crop_px: np.ndarray) -> float:
    """Mean distance, crop px, of the 5 alignment points of (68, 2) crop landmarks from TEMPLATE_5PT_PX."""
    return float(np.linalg.norm(five_points(lmk_crop_px) - TEMPLATE_5PT_PX, axis=1).mean())


def crop_landmarks(crop_rgb: np.ndarray, box_crop_px: np.ndarray, settings: LandmarkSettings) -> np.ndarray:
    """68 landmarks of an aligned crop. crop_rgb: (224, 224, 3) uint8; box_crop_px: (4,) detection box in crop
    px. Returns (68, 2) float32 crop px. Raises Rejected 'landmarks off template'."""
    lmk_crop_px = fit_landmarks(crop_rgb, box_crop_px)
    error = template_error_px(lmk_crop_px)
    if error > settings.max_template_px:
        raise Rejected(OFF_TEMPLATE, f"5 points {error:.1f} px from the template > {settings.max_template_px}")
    return lmk_crop_px


def landmarks_task(row: dict, settings: LandmarkSettings) -> tuple[list[dict], list[dict]]:
    """crop_landmarks on a crops-table row (id, source, crop, box_crop, score) as a stage task: ([{id, landmarks
    (136,) float32 crop px, score}], []) or ([], [the face's reject row]); never raises."""
    try:
        lmk = crop_landmarks(decode_rgb(row["crop"]), np.asarray(row["box_crop"]), settings)
    except Exception as error:  # noqa: BLE001 - a bad face becomes a reject row, never a crashed run
        return [], [reject_row(row["source"], STAGE, error, row["id"])]
    return [{"id": row["id"], "landmarks": lmk.reshape(-1), "score": row["score"]}], []


def run_landmarks(crops_path: Path, settings: LandmarkSettings, workers: int, landmarks_path: Path,
                  rejects_path: Path) -> StageReport:
    """The `landmarks` stage: crops table -> landmarks table (LANDMARKS_SCHEMA, in crop order) and its rejects.
    Returns the stage report (inputs = outputs + rejects = faces)."""
    crops = iter_rows(crops_path, columns=["id", "source", "crop", "box_crop", "score"])
    task = functools.partial(landmarks_task, settings=settings)
    return run_stage(STAGE, task, crops, count_rows(crops_path), workers, 64, landmarks_path, LANDMARKS_SCHEMA,
                     rejects_path)
