"""Aligned crops + landmarks -> soft face-region masks (the `masks` stage).

Two methods: BiSeNet face parsing (the probability of the chosen classes) when its weights are given, else
the landmark-guided skin colour model (skin_model.py), which needs no network.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..shards.accounting import Rejected, StageReport, reject_row
from ..shards.image_bytes import decode_rgb, encode_png
from ..shards.stage_run import run_stage
from ..shards.ranks import RankShare, photo_of
from ..shards.tables import MASKS_SCHEMA, iter_rows, join_in_order
from .skin_model import skin_mask

STAGE = "masks"
EMPTY_MASK = "empty mask"
DEFAULT_FACE_CLASSES = ("skin", "nose", "brows", "eyes", "lips", "mouth")


@dataclass(frozen=True)
class MaskSettings:
    """The `masks` params. face_classes: BiSeNet classes (or groups: brows, eyes, ears, lips) that make up the
    face; bisenet_weights: path of face-parsing.PyTorch's 79999_iter.pth, "" for the skin colour model;
    forehead_lift, feather_px: skin model outline and edge softness (see skin_mask); min_coverage: reject a face
    whose mask weighs less than this fraction of the crop."""
    face_classes: tuple[str, ...] = DEFAULT_FACE_CLASSES
    bisenet_weights: str = ""
    forehead_lift: float = 0.3
    feather_px: float = 2.0
    min_coverage: float = 0.05

    def __post_init__(self):
        object.__setattr__(self, "face_classes", tuple(self.face_classes))  # a YAML list, hashable for caching
        if not 0 <= self.min_coverage < 1:
            raise ValueError(f"masks.min_coverage must be in [0, 1), got {self.min_coverage}")
        if self.bisenet_weights and not Path(self.bisenet_weights).is_file():
            raise ValueError(f"masks.bisenet_weights: no such file {self.bisenet_weights!r} "
                             "(face-parsing.PyTorch's 79999_iter.pth; \"\" uses the skin colour model)")

    @property
    def method(self) -> str:
        """"bisenet" or "skin_gmm" (the `method` column of the masks table)."""
        return "bisenet" if self.bisenet_weights else "skin_gmm"


@functools.cache
def _bisenet(weights: str, device: str, face_classes: tuple[str, ...]):
    # imported here: torch and the network are only needed when weights are given
    from ..nets.bisenet import CLASS_NAMES, IMAGENET_MEAN, IMAGENET_STD, load_bisenet
    from .face_parsing import parse_face_masks, parsing_class_ids
    net = load_bisenet(weights, device)
    class_ids = parsing_class_ids(face_classes, CLASS_NAMES)
    return functools.partial(parse_face_masks, net, class_ids=class_ids, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def load_mask_model(settings: MaskSettings, device: str = "cpu") -> None:
    """Load BiSeNet into this process now when it is configured, so that a wrong weights file or an unknown face
    class fails the run before the first face instead of rejecting every face. Raises ValueError,
    FileNotFoundError."""
    if settings.bisenet_weights:
        _bisenet(settings.bisenet_weights, device, settings.face_classes)


def face_mask(crop_rgb: np.ndarray, lmk_px: np.ndarray, settings: MaskSettings, device: str = "cpu") -> np.ndarray:
    """The face-region mask of one aligned crop.

    crop_rgb: (S, S, 3) uint8 RGB; lmk_px: (68, 2) crop px (used by the skin model); device: where BiSeNet runs.
    Returns (S, S) uint8 soft weights 0..255. Raises Rejected 'empty mask' below settings.min_coverage.
    """
    if settings.bisenet_weights:
        parse = _bisenet(settings.bisenet_weights, device, settings.face_classes)
        weights = parse(crop_rgb[None])[0]
    else:
        weights = skin_mask(crop_rgb, lmk_px, settings.forehead_lift, settings.feather_px)
    coverage = float(weights.mean())
    if coverage < settings.min_coverage:
        raise Rejected(EMPTY_MASK, f"mask covers {coverage:.3f} of the crop < {settings.min_coverage}")
    return (weights * 255.0 + 0.5).astype(np.uint8)


def mask_task(row: dict, settings: MaskSettings, device: str) -> tuple[list[dict], list[dict]]:
    """face_mask on a row with id, source, crop (JPEG) and landmarks (136 values, crop px) as a stage task:
    ([{id, mask PNG bytes, method}], []) or ([], [the face's reject row]); never raises."""
    try:
        lmk = np.asarray(row["landmarks"], np.float32).reshape(68, 2)
        mask = face_mask(decode_rgb(row["crop"]), lmk, settings, device)
    except Exception as error:  # noqa: BLE001 - a bad face becomes a reject row, never a crashed run
        return [], [reject_row(row["source"], STAGE, error, row["id"])]
    return [{"id": row["id"], "mask": encode_png(mask), "method": settings.method}], []


def run_masks(crops_path: Path, landmarks_path: Path, settings: MaskSettings, workers: int, device: str,
              masks_path: Path, rejects_path: Path, share: RankShare = RankShare()) -> StageReport:
    """The `masks` stage: the faces of the landmarks table (crops joined in order) of this rank's photos
    (`share`; all of them in one process) -> masks table (MASKS_SCHEMA) and its rejects. With BiSeNet everything
    runs in this process on `device` ("cpu" | "cuda[:i]"), torch using its own threads; the skin model runs over
    `workers` processes. Returns the stage report."""
    faces = join_in_order(iter_rows(crops_path, columns=["id", "source", "crop"]),
                          iter_rows(landmarks_path, columns=["id", "landmarks"]))
    faces = (row for row in faces if share.takes(photo_of(row["id"])))
    load_mask_model(settings, device)
    task = functools.partial(mask_task, settings=settings, device=device)
    processes = 1 if settings.bisenet_weights else workers
    return run_stage(STAGE, task, faces, share.count(landmarks_path), processes, 8, masks_path, MASKS_SCHEMA,
                     rejects_path)
