"""Preprocessing throughput: the four stages end to end against their bound, dlib detection + 68 landmarks alone.

Both are timed once over the same photos with the same worker count. Before timing, the workers' fork server
is started and the dlib models are loaded in the calling process (where small stages run in-process), so
neither number includes those one-off costs and which one runs first does not matter; each pool's workers
still load their own models, in both.
"""
from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ..detect.crop import CropSettings, run_crop, select_faces
from ..detect.dlib_faces import cnn_detector, detect_faces, fit_landmarks, hog_detector, shape_predictor_68
from ..detect.landmarks import LandmarkSettings, run_landmarks
from ..detect.photo_io import read_photo
from ..segment.masks import MaskSettings, run_masks
from ..shards.accounting import Rejected
from ..shards.pack import run_pack
from ..shards.parallel import map_parallel, start_worker_server


def _prepare(detector: str) -> None:
    start_worker_server()
    hog_detector()
    shape_predictor_68()
    if detector == "cnn":
        cnn_detector()


def preprocess_img_s(photos: Sequence[Path], root: Path, crop: CropSettings, landmarks: LandmarkSettings,
                     masks: MaskSettings, workers: int, val_ratio: float = 0.1, shard_rows: int = 4096,
                     row_group_rows: int = 64) -> float:
    """Photos/s of crop -> landmarks -> masks -> pack exactly as the stages run them (run_crop, run_landmarks,
    run_masks, run_pack: their tables, worker pools and shards), written to a temporary folder. photos: files
    under `root` (face ids are relative to it); workers: processes, 0 = all cores."""
    _prepare(crop.detector)
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


def _detect_and_fit(path: Path, settings: CropSettings) -> int:
    try:
        rgb = read_photo(path, settings.max_pixels, settings.min_face_px)
        found = detect_faces(rgb, settings.detector, settings.upsample, settings.min_score,
                             settings.detect_max_side_px)
        chosen = select_faces(found, settings)
    except Rejected:
        return 0
    for detection in chosen:
        fit_landmarks(rgb, detection.box_px)
    return len(chosen)


def dlib_bound_img_s(photos: Sequence[Path], crop: CropSettings, workers: int) -> float:
    """Photos/s of the work no preprocessing can skip: decode, dlib detection and the 68-landmark fit of the faces
    kept, at the `crop` settings, over `workers` processes (0 = all cores) as the crop stage distributes it."""
    _prepare(crop.detector)
    task = functools.partial(_detect_and_fit, settings=crop)
    start = time.perf_counter()
    for _ in map_parallel(task, list(photos), workers, chunk_size=1, total=len(photos), desc="dlib bound"):
        pass
    return len(photos) / (time.perf_counter() - start)
