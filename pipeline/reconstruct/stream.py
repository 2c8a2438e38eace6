"""Faces (a table, or batches streamed from the shards) -> reconstruction rows, batch by batch: read ahead,
reconstruct, score.

Three kinds of work per batch: decoding its images (a reader thread, one batch ahead), its coefficients (the R-Net
forward pass or the fit, in the caller's thread, on every core) and its scoring (face_rows: the render, loss terms
and PSNR; then on_batch, e.g. file writing), which is many small ops that intra-op threads split poorly (measured
on 2 cores, batch of 32: 3.4 ms per face on 1 thread, 2.6 on 2, 2.1 as two single-threaded slices of 16).
- On CPU, scoring follows the coefficients: the batch is cut into one slice per core, each scored by a worker
  with one intra-op thread, and the next batch decodes beside them, so the forward pass has every core to itself.
  Overlapping scoring with the next forward pass instead made the forward's OpenMP threads spin at their barriers
  while a scorer held a core: it took as much CPU time as running the two one after the other.
- On a GPU, batch k is scored (one slice) while batch k + 1's coefficients are computed, so host and device work
  overlap.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Iterable, Iterator
from typing import Callable

import pandas as pd
import torch

from ..face_model import FaceDecoder
from ..render.face import FaceRender
from .batch import FaceBatch, reconstruct_batch
from .fit import FitSettings
from .outputs import face_rows, faces_to_batch

# (faces of a slice, their rows, their render, their FaceBatch): writes per-face files, reports progress
BatchDone = Callable[[pd.DataFrame, list[dict], FaceRender, FaceBatch], None]


def overlaps_scoring(device: torch.device) -> bool:
    """Whether batch k is scored while batch k + 1 is reconstructed (a GPU), or after it, on every core (CPU)."""
    return device.type != "cpu"


def reconstruct_faces(decoder: FaceDecoder, faces: pd.DataFrame, method: str, fit: FitSettings,
                      network: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      refine_steps: int = 0, batch_size: int = 32, on_batch: BatchDone | None = None) -> list[dict]:
    """Reconstruct every face of `faces` (rows with crop/mask/landmarks as in the shards) in batches of
    batch_size (reconstruct_stream). Returns one row per face (face_rows), in table order."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    batches = (faces.iloc[lo:lo + batch_size] for lo in range(0, len(faces), batch_size))
    return [row for rows in reconstruct_stream(decoder, batches, method, fit, network, refine_steps,
                                               on_batch) for row in rows]


def reconstruct_stream(decoder: FaceDecoder, batches: Iterable[pd.DataFrame], method: str, fit: FitSettings,
                       network: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       refine_steps: int = 0, on_batch: BatchDone | None = None) -> Iterator[list[dict]]:
    """Reconstruct each batch of faces (DataFrames of rows with crop/mask/landmarks as in the shards, read lazily:
    a streamed input is read one batch ahead) by `method` (reconstruct_batch); yields each batch's rows
    (face_rows), in input order, so the caller can write them and keep nothing.

    Scheduling as in the module docstring. on_batch(...) is called once per scored slice, from a worker thread,
    possibly for two slices at once, so it must be thread-safe; a batch's on_batch calls are done before its rows
    are yielded. Each face's row is the same as face_rows over its whole batch. A scoring failure reaches the
    caller, and stops the run before the next batch is reconstructed when it has already happened.
    """
    device = decoder.triangles.device
    overlap = overlaps_scoring(device)
    n_scorers = 1 if overlap else torch.get_num_threads()
    pending = (chunk for chunk in batches if len(chunk))

    def score(chunk: pd.DataFrame, coeffs: torch.Tensor, batch: FaceBatch) -> list[dict]:
        chunk_rows, render = face_rows(decoder, coeffs, batch, chunk, method, fit)
        if on_batch is not None:
            on_batch(chunk, chunk_rows, render, batch)
        return chunk_rows

    def rows_of(futures: list[Future]) -> list[dict]:
        return [row for future in futures for row in future.result()]  # re-raises a worker's error here

    main_threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="read") as reader, \
                ThreadPoolExecutor(n_scorers, thread_name_prefix="score",
                                   initializer=None if overlap else torch.set_num_threads, initargs=(1,)) as scorers:
            chunk = next(pending, None)
            decoded = reader.submit(faces_to_batch, chunk, device) if chunk is not None else None
            scoring: list[Future] = []
            while chunk is not None:
                for future in scoring:
                    if future.done():
                        future.result()  # a failed slice stops the run before another fit is spent
                batch = decoded.result()
                following = next(pending, None)
                if overlap and following is not None:
                    decoded = reader.submit(faces_to_batch, following, device)
                coeffs = reconstruct_batch(decoder, batch, method, fit, network, refine_steps)
                if not overlap and following is not None:  # on CPU the next batch decodes beside the scorers
                    decoded = reader.submit(faces_to_batch, following, device)
                if scoring:
                    yield rows_of(scoring)
                bounds = [len(chunk) * i // n_scorers for i in range(n_scorers + 1)]
                scoring = [scorers.submit(score, chunk.iloc[lo:hi], coeffs[lo:hi], batch[lo:hi])
                           for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
                if not overlap:
                    yield rows_of(scoring)
                    scoring = []
                chunk = following
            if scoring:
                yield rows_of(scoring)
    finally:
        # torch.set_num_threads(1) in a scorer also sets the count that threads started later begin with
        torch.set_num_threads(main_threads)
