"""The whole per-photo preprocessing (crop -> landmarks -> masks) in one call, for callers that work on a folder
or single photos in-process (the reconstruct stage) instead of through the staged tables."""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa

from ..segment.masks import MaskSettings, load_mask_model, mask_task
from ..shards.parallel import map_parallel
from ..shards.tables import REJECTS_SCHEMA, SHARD_SCHEMA
from .crop import CropSettings, crop_task
from .landmarks import LandmarkSettings, landmarks_task

Rows = tuple[list[dict], list[dict]]


def _then(task: Callable[[dict], Rows], previous: Rows) -> Rows:
    # a stage task adds columns to each surviving row and reject rows for the others
    rows, rejects = [], list(previous[1])
    for row in previous[0]:
        added, rejected = task(row)
        rows += [{**row, **columns} for columns in added]
        rejects += rejected
    return rows, rejects


def preprocess_photo(path: str | Path, crop: CropSettings, landmarks: LandmarkSettings, masks: MaskSettings | None,
                     root: str | Path | None = None, device: str = "cpu") -> Rows:
    """One photo through the crop, landmarks and (unless masks is None) masks steps, as the stages do it.

    root: folder that face ids are relative to (None: the path as given); device: where BiSeNet runs.
    Returns (faces, rejects): faces are dicts with the SHARD_SCHEMA columns (crop JPEG bytes, landmarks (136,)
    float32 crop px, mask PNG bytes, transform (6,) photo px -> crop px, ...), rejects are REJECTS_SCHEMA rows
    for the photo or for single faces of it. Never raises for a bad photo.
    """
    root = Path(root) if root is not None else None
    faces = crop_task(Path(path), crop, root)
    faces = _then(functools.partial(landmarks_task, settings=landmarks), faces)
    if masks is not None:
        faces = _then(functools.partial(mask_task, settings=masks, device=device), faces)
    return faces


def preprocess_photos(paths: Sequence[str | Path], crop: CropSettings, landmarks: LandmarkSettings,
                      masks: MaskSettings, workers: int, root: str | Path | None = None,
                      device: str = "cpu") -> tuple[pd.DataFrame, pd.DataFrame]:
    """preprocess_photo over many photos on `workers` processes (0 = all cores); BiSeNet masks, when configured,
    are computed afterwards in this process on `device`. Returns (faces, rejects) DataFrames with the columns of
    read_faces (SHARD_SCHEMA) and of the rejects tables (path, stage, reason, detail, id)."""
    load_mask_model(masks, device)
    in_workers = None if masks.method == "bisenet" else masks
    task = functools.partial(preprocess_photo, crop=crop, landmarks=landmarks, masks=in_workers, root=root)
    faces, rejects = [], []
    for photo_faces, photo_rejects in map_parallel(task, [Path(p) for p in paths], workers, chunk_size=1,
                                                   total=len(paths), desc="preprocess"):
        faces += photo_faces
        rejects += photo_rejects
    if in_workers is None:
        faces, rejects = _then(functools.partial(mask_task, settings=masks, device=device), (faces, rejects))
    return (pa.Table.from_pylist(faces, schema=SHARD_SCHEMA).to_pandas(),
            pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA).to_pandas())
