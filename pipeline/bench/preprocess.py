"""Preprocessing throughput: the four stages end to end against their bound, the detection and landmarks of the
chosen sources alone (the detector chain, the face mesh's passes and the alignment they drive and, for
landmarks.source dlib or fused, dlib's 68-point fit on the crop with the seed box the landmarks stage gives it:
HOG's box found on the crop for a face another detector found).

Both are timed once over the same photos with the same worker count. Before timing, the workers' fork server
is started and the models are loaded in the calling process (where small stages run in-process), so neither
number includes those one-off costs and which one runs first does not matter; each pool's workers still load
their own models, in both.
"""
from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ..detect.alignment import box_to_crop
from ..detect.crop import CropSettings, align_face, run_crop, select_faces
from ..detect.dlib_faces import cnn_detector, fit_landmarks, hog_detector, shape_predictor_68
from ..detect.faces import detect_chain
from ..detect.mediapipe import BLAZEFACE, MESH_MODEL, interpreter
from ..detect.landmarks import LandmarkSettings, dlib_box_crop, run_landmarks
from ..detect.photo_io import read_photo
from ..segment.masks import MaskSettings, run_masks
from ..shards.accounting import Rejected
from ..shards.pack import run_pack
from ..shards.parallel import map_parallel, start_worker_server


def _prepare(detectors: tuple[str, ...]) -> None:
    start_worker_server()
    hog_detector()
    shape_predictor_68()
    if "cnn" in detectors:
        cnn_detector()
    for name in detectors:
        if name in BLAZEFACE:
            interpreter(BLAZEFACE[name].file)
    interpreter(MESH_MODEL)


def preprocess_img_s(photos: Sequence[Path], root: Path, crop: CropSettings, landmarks: LandmarkSettings,
                     masks: MaskSettings, workers: int, val_ratio: float = 0.1, shard_rows: int = 4096,
                     row_group_rows: int = 64) -> float:
    """Photos/s of crop -> landmarks -> masks -> pack exactly as the stages run them (run_crop, run_landmarks,
    run_masks, run_pack: their tables, worker pools and shards), written to a temporary folder. photos: files
    under `root` (face ids are relative to it); workers: processes, 0 = all cores."""
    _prepare(crop.detectors)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        start = time.perf_counter()
        run_crop(list(photos), root, crop, workers, out / "crops.parquet", out / "crop_rejects.parquet")
        run_landmarks(out / "crops.parquet", landmarks, workers, out / "landmarks.parquet",
                      out / "landmarks_rejects.parquet")
        run_masks(out / "crops.parquet", out / "landmarks.parquet", masks, workers, "cpu", out / "masks.parquet",
                  out / "masks_rejects.parquet")
        run_pack(out / "crops.parquet", out / "landmarks.parquet", out / "masks.parquet",
                 [out / f"{s}_rejects.parquet" for s in ("crop", "landmarks", "masks")], out / "shards",
                 out / "rejects.parquet", val_ratio, shard_rows, row_group_rows)
        return len(photos) / (time.perf_counter() - start)


def _detect_and_fit(path: Path, settings: CropSettings, landmarks: LandmarkSettings | None) -> int:
    try:
        rgb = read_photo(path, settings.max_pixels, settings.min_face_px)
        found = detect_chain(rgb, settings.detectors, settings.upsample, settings.min_score,
                             settings.blazeface_min_score, settings.detect_max_side_px)
        chosen = select_faces(found, settings)
    except Rejected:
        return 0
    for detection in chosen:
        crop, transform, _, _ = align_face(rgb, detection, settings.mesh_passes)
        if landmarks is not None:
            seed = {"detector": detection.detector, "box_crop": box_to_crop(detection.box_px, transform)}
            fit_landmarks(crop, dlib_box_crop(seed, crop), landmarks.dlib_box_scales, landmarks.dlib_mirror)
    return len(chosen)


def landmark_bound_img_s(photos: Sequence[Path], crop: CropSettings, landmarks: LandmarkSettings,
                         workers: int) -> float:
    """Photos/s of the work no preprocessing can skip: decode, the detector chain, the face mesh of each face kept
    and its alignment to the crop and, unless landmarks.source is "mesh", dlib's 68-point fit on that crop from
    the seed box the landmarks stage uses (dlib_box_crop), with its passes (dlib_box_scales, dlib_mirror), at the
    `crop` settings, over `workers` processes
    (0 = all cores) as the crop stage distributes it. Not in it: encoding, tables, masks, shards, the pools."""
    _prepare(crop.detectors)
    task = functools.partial(_detect_and_fit, settings=crop,
                             landmarks=None if landmarks.source == "mesh" else landmarks)
    start = time.perf_counter()
    for _ in map_parallel(task, list(photos), workers, chunk_size=1, total=len(photos), desc="landmark bound"):
        pass
    return len(photos) / (time.perf_counter() - start)
