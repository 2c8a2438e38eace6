"""A faces table -> reconstruction rows, batch by batch, with scoring overlapped with the next batch's coefficients.

The scoring render (face_rows) and file writing are mostly single-threaded (many small gathers and scatters,
PNG/OBJ encoding), while the R-Net forward pass or the fit uses every core. Running batch k's scoring in one
worker thread while batch k+1 is reconstructed fills the core that scoring leaves idle.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import pandas as pd
import torch

from ..face_model import FaceDecoder
from ..render.face import FaceRender
from .batch import FaceBatch, reconstruct_batch
from .fit import FitSettings
from .outputs import face_rows, faces_to_batch

# (faces of the batch, their rows, their render, the batch): writes per-face files, reports progress
BatchDone = Callable[[pd.DataFrame, list[dict], FaceRender, FaceBatch], None]


def reconstruct_faces(decoder: FaceDecoder, faces: pd.DataFrame, method: str, fit: FitSettings,
                      lmk_weights: torch.Tensor, network: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      refine_steps: int = 0, batch_size: int = 32, on_batch: BatchDone | None = None) -> list[dict]:
    """Reconstruct every face of `faces` (rows with crop/mask/landmarks as in the shards) in batches of
    batch_size by `method` (reconstruct_batch). Returns one row per face (face_rows), in table order.

    Batch k's rows and on_batch(...) run in a worker thread while the caller's thread decodes and reconstructs
    batch k + 1 (its R-Net forward or fit); at most one batch waits for scoring, so memory holds two batches.
    Results do not depend on the overlap: each batch's ops are the same as when run one after another. On a GPU
    the peak memory is one batch's fit (or forward) plus the previous batch's scoring render.
    A scoring failure stops the run before the next batch is reconstructed when it has already happened.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    device = decoder.triangles.device
    rows: list[dict] = []

    def score(chunk: pd.DataFrame, coeffs: torch.Tensor, batch: FaceBatch) -> None:
        chunk_rows, render = face_rows(decoder, coeffs, batch, chunk, method, lmk_weights, fit.weights)
        if on_batch is not None:
            on_batch(chunk, chunk_rows, render, batch)
        rows.extend(chunk_rows)

    with ThreadPoolExecutor(1, thread_name_prefix="score") as worker:
        scored: Future | None = None
        for lo in range(0, len(faces), batch_size):
            if scored is not None and scored.done():
                scored.result()  # a failed batch stops the run before another fit is spent
            chunk = faces.iloc[lo:lo + batch_size]
            batch = faces_to_batch(chunk, device)
            coeffs = reconstruct_batch(decoder, batch, method, fit, lmk_weights, network, refine_steps)
            if scored is not None:
                scored.result()  # re-raises the worker's error here; keeps rows in table order
            scored = worker.submit(score, chunk, coeffs, batch)
        if scored is not None:
            scored.result()
    return rows
