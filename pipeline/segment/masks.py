"""Aligned crops + landmarks (+ the face mesh) -> soft face-region masks (the `masks` stage).

Three methods (masks.method): `mesh`, the 468-point face mesh's face region gated by skin colour (mesh_mask.py);
`skin`, the landmark-guided skin colour model (skin_model.py); `bisenet`, BiSeNet face parsing (the probability
of the chosen classes) with the user's weights. A face whose mesh is missing or below min_mesh_score gets the
skin model instead, and its row says so (`method` "skin", `fallback` the reason): never a crash, never silent.
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..shards.accounting import Rejected, StageReport, reject_row
from ..shards.image_bytes import decode_rgb, encode_png
from ..shards.stage_run import run_stage
from ..shards.ranks import RankShare, photo_of
from ..shards.tables import MASKS_SCHEMA, iter_rows, join_in_order
from .mesh_mask import mesh_mask, mesh_triangles, mesh_usable
from .skin_model import skin_mask

STAGE = "masks"
EMPTY_MASK = "empty mask"
DEFAULT_FACE_CLASSES = ("skin", "nose", "brows", "eyes", "lips", "mouth")


METHODS = ("mesh", "skin", "bisenet")


@dataclass(frozen=True)
class MaskSettings:
    """The `masks` params. method: one of METHODS; face_classes: BiSeNet classes (or groups: brows, eyes, ears,
    lips) that make up the face; bisenet_weights: path of face-parsing.PyTorch's 79999_iter.pth (method bisenet
    only); mesh_obj: MediaPipe's canonical_face_model.obj (its triangulation; method mesh); min_mesh_score: a
    face whose mesh is less confident falls back to the skin model (method mesh); skin_gate: p(skin) at and
    above which the mesh region keeps full weight (0: no colour gate; see mesh_mask); forehead_lift, feather_px:
    skin model outline and edge softness (see skin_mask; feather_px for the mesh mask too); min_coverage: reject a
    face whose mask weighs less than this fraction of the crop."""
    method: str = "skin"
    face_classes: tuple[str, ...] = DEFAULT_FACE_CLASSES
    bisenet_weights: str = ""
    mesh_obj: str = "../shared/face_models/mediapipe/canonical_face_model.obj"
    min_mesh_score: float = 0.5
    skin_gate: float = 0.5
    forehead_lift: float = 0.3
    feather_px: float = 2.0
    min_coverage: float = 0.05

    def __post_init__(self):
        object.__setattr__(self, "face_classes", tuple(self.face_classes))  # a YAML list, hashable for caching
        if self.method not in METHODS:
            raise ValueError(f"masks.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0 <= self.min_coverage < 1:
            raise ValueError(f"masks.min_coverage must be in [0, 1), got {self.min_coverage}")
        if not 0 <= self.min_mesh_score <= 1:
            raise ValueError(f"masks.min_mesh_score must be in [0, 1], got {self.min_mesh_score}")
        if not 0 <= self.skin_gate <= 1:
            raise ValueError(f"masks.skin_gate must be in [0, 1], got {self.skin_gate}")
        if self.method == "bisenet" and not self.bisenet_weights:
            raise ValueError("masks.method bisenet needs masks.bisenet_weights (face-parsing.PyTorch's "
                             "79999_iter.pth); without them use method mesh or skin")
        if self.bisenet_weights and not Path(self.bisenet_weights).is_file():
            raise ValueError(f"masks.bisenet_weights: no such file {self.bisenet_weights!r} "
                             "(face-parsing.PyTorch's 79999_iter.pth)")
        if self.method != "bisenet" and self.bisenet_weights:  # weights the run would silently ignore
            raise ValueError(f"masks.bisenet_weights is set but masks.method is {self.method!r}: set method "
                             "bisenet, or bisenet_weights \"\"")
        if self.method == "mesh" and not Path(self.mesh_obj).is_file():
            raise ValueError(f"masks.mesh_obj: no such file {self.mesh_obj!r} (MediaPipe's "
                             "canonical_face_model.obj, for method mesh)")


class FaceMask(NamedTuple):
    """One face's mask and how it was made."""
    weights: np.ndarray  # (S, S) uint8 soft weights 0..255
    method: str          # the method that made it: mesh | skin | bisenet
    fallback: str | None  # why the configured method was not used (None: it was)


@functools.cache
def _bisenet(weights: str, device: str, face_classes: tuple[str, ...]):
    # imported here: torch and the network are only needed when weights are given
    from ..nets.bisenet import CLASS_NAMES, IMAGENET_MEAN, IMAGENET_STD, load_bisenet
    from .face_parsing import parse_face_masks, parsing_class_ids
    net = load_bisenet(weights, device)
    class_ids = parsing_class_ids(face_classes, CLASS_NAMES)
    return functools.partial(parse_face_masks, net, class_ids=class_ids, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def load_mask_model(settings: MaskSettings, device: str = "cpu") -> None:
    """Load BiSeNet (method bisenet) or the mesh triangulation (method mesh) into this process now, so that a
    wrong weights or OBJ file or an unknown face class fails the run before the first face instead of rejecting
    every face. Raises ValueError, FileNotFoundError."""
    if settings.method == "bisenet":
        _bisenet(settings.bisenet_weights, device, settings.face_classes)
    elif settings.method == "mesh":
        mesh_triangles(settings.mesh_obj)


def face_mask(crop_rgb: np.ndarray, lmk_px: np.ndarray, settings: MaskSettings, device: str = "cpu",
              mesh_px: np.ndarray | None = None, mesh_score: float | None = None) -> FaceMask:
    """The face-region mask of one aligned crop by settings.method; method mesh falls back to the skin model
    when the mesh is unusable (mesh_usable: missing, non-finite, mesh_score < settings.min_mesh_score).

    crop_rgb: (S, S, 3) uint8 RGB; lmk_px: (68, 2) crop px (the skin model's outline and colour samples);
    device: where BiSeNet runs; mesh_px: (468, 3) crop px or None; mesh_score: its confidence in [0, 1].
    Returns FaceMask. Raises Rejected 'empty mask' below settings.min_coverage.
    """
    method, fallback = settings.method, None
    if method == "mesh":
        fallback = mesh_usable(mesh_px, mesh_score, settings.min_mesh_score)
        method = "skin" if fallback else "mesh"
    if method == "bisenet":
        parse = _bisenet(settings.bisenet_weights, device, settings.face_classes)
        weights = parse(crop_rgb[None])[0]
    elif method == "mesh":
        weights = mesh_mask(crop_rgb, np.asarray(mesh_px, np.float64).reshape(-1, 3), lmk_px,
                            mesh_triangles(settings.mesh_obj), settings.skin_gate, settings.feather_px,
                            settings.forehead_lift)
    else:
        weights = skin_mask(crop_rgb, lmk_px, settings.forehead_lift, settings.feather_px)
    coverage = float(weights.mean())
    if coverage < settings.min_coverage:
        raise Rejected(EMPTY_MASK, f"mask covers {coverage:.3f} of the crop < {settings.min_coverage} ({method})")
    return FaceMask((weights * 255.0 + 0.5).astype(np.uint8), method, fallback)


def mask_task(row: dict, settings: MaskSettings, device: str) -> tuple[list[dict], list[dict]]:
    """face_mask on a row with id, source, crop (JPEG), landmarks (136 values, crop px) and, for method mesh,
    mesh (468 x 3 values, crop px) and mesh_score, as a stage task: ([{id, mask PNG bytes, method, fallback}],
    []) or ([], [the face's reject row]); never raises."""
    try:
        lmk = np.asarray(row["landmarks"], np.float32).reshape(68, 2)
        mask = face_mask(decode_rgb(row["crop"]), lmk, settings, device, row.get("mesh"), row.get("mesh_score"))
    except Exception as error:  # noqa: BLE001 - a bad face becomes a reject row, never a crashed run
        return [], [reject_row(row["source"], STAGE, error, row["id"])]
    return [{"id": row["id"], "mask": encode_png(mask.weights), "method": mask.method,
             "fallback": mask.fallback}], []


def run_masks(crops_path: Path, landmarks_path: Path, settings: MaskSettings, workers: int, device: str,
              masks_path: Path, rejects_path: Path, share: RankShare = RankShare()) -> StageReport:
    """The `masks` stage: the faces of the landmarks table (crops joined in order) of this rank's photos
    (`share`; all of them in one process) -> masks table (MASKS_SCHEMA) and its rejects. With BiSeNet everything
    runs in this process on `device` ("cpu" | "cuda[:i]"), torch using its own threads; the other methods run
    over `workers` processes. Returns the stage report, its extra counts: faces per method used (`methods`) and
    faces that fell back from the mesh (`mesh_fallbacks`)."""
    faces = join_in_order(iter_rows(crops_path, columns=["id", "source", "crop", "mesh", "mesh_score"]),
                          iter_rows(landmarks_path, columns=["id", "landmarks"]))
    faces = (row for row in faces if share.takes(photo_of(row["id"])))
    load_mask_model(settings, device)
    task = functools.partial(mask_task, settings=settings, device=device)
    processes = 1 if settings.method == "bisenet" else workers
    report = run_stage(STAGE, task, faces, share.count(landmarks_path), processes, 8, masks_path, MASKS_SCHEMA,
                       rejects_path)
    written = list(iter_rows(masks_path, columns=["method", "fallback"]))
    report.extra = {"methods": dict(Counter(r["method"] for r in written)),
                    "mesh_fallbacks": sum(1 for r in written if r["fallback"])}
    return report
