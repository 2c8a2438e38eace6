"""Face-mask methods compared (the `mask_comparison` stage): IoU with the true face region of synthetic faces, IoU
between the methods on real photos (no truth there), the fit's vertex error on the synthetic faces and its
landmark NME on the annotated photos with each method's masks, all in one run.

Masks are binarised at half weight (>= 128 of 255) for the IoUs. The synthetic faces go through the whole
preprocessing (detection, alignment, landmarks) as in `reconstruct_synth`; their true regions are rendered from
the truth and warped into each face's crop (synth.true_region_in_crop), for both kinds of synth.TRUE_REGIONS.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..face_model import FaceDecoder, FaceModel
from ..reconstruct.fit import FitSettings
from ..reconstruct.stream import reconstruct_faces
from ..segment.masks import MaskSettings, face_mask
from ..shards.accounting import Rejected
from ..shards.image_bytes import decode_rgb, encode_png
from .annotations import Annotation
from .benchmark import annotated_metrics, annotated_scores, stack_column, synthetic_scores
from .metrics import check_shape
from .synth import TRUE_REGIONS, true_region_in_crop, true_region_weights

HALF_WEIGHT = 128  # of 255: a mask pixel counts as face at and above half weight


def mask_variants(settings: MaskSettings, gated_skin_gate: float) -> dict[str, MaskSettings]:
    """The methods compared, from the `masks` params: mesh (with the configured skin_gate), mesh_gated (the
    mesh region gated by skin colour at `gated_skin_gate`) and the skin colour model."""
    return {"mesh": replace(settings, method="mesh", bisenet_weights=""),
            "mesh_gated": replace(settings, method="mesh", bisenet_weights="", skin_gate=gated_skin_gate),
            "skin": replace(settings, method="skin", bisenet_weights="")}


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union (N,) of bool masks a, b (N, H, W); 1 where both are empty."""
    check_shape("b", b, a.shape)
    inter = (a & b).sum(axis=(1, 2))
    union = (a | b).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def faces_masks(faces: pd.DataFrame, settings: MaskSettings) -> tuple[np.ndarray, list[str], list[str | None]]:
    """face_mask on every row of faces (crop, landmarks, mesh, mesh_score columns, as in the shards): (weights
    (N, S, S) uint8, the method each used, each fallback reason or None). A face whose mask is refused (empty
    mask) gets all zeros and method 'rejected'."""
    weights, methods, fallbacks = [], [], []
    for row in faces.itertuples(index=False):
        crop = decode_rgb(row.crop)
        try:
            mask = face_mask(crop, np.asarray(row.landmarks, np.float32).reshape(68, 2), settings,
                             mesh_px=row.mesh, mesh_score=row.mesh_score)
        except Rejected as error:
            weights.append(np.zeros(crop.shape[:2], np.uint8))
            methods.append("rejected")
            fallbacks.append(str(error))
            continue
        weights.append(mask.weights)
        methods.append(mask.method)
        fallbacks.append(mask.fallback)
    return np.stack(weights), methods, fallbacks


def true_regions(model: FaceModel, decoder: FaceDecoder, truth: pd.DataFrame, faces: pd.DataFrame,
                 size_px: int) -> dict:
    """{kind: (N, S, S) bool} the true region (TRUE_REGIONS) of each face of `faces` in its crop, for the faces
    of `model` (decoded by `decoder`, the model the synthetic faces were drawn from). truth: the
    rows of truth.parquet, one per face of `faces` in the same order (coefficient groups and `transform`, render px
    -> canvas px); faces: their preprocessed rows (`transform`: canvas px -> crop px)."""
    coeffs = np.stack([np.concatenate([np.asarray(r[g], np.float32) for g in decoder.layout.sizes])
                       for _, r in truth.iterrows()])
    to_crop = compose(stack_column(faces["transform"], (2, 3)), stack_column(truth["transform"], (2, 3)))
    return {kind: true_region_in_crop(decoder, coeffs, true_region_weights(model, kind), to_crop, size_px)
            for kind in TRUE_REGIONS}


def compose(second: np.ndarray, first: np.ndarray) -> np.ndarray:
    """The affine maps (N, 2, 3) x -> second(first(x)) of two (N, 2, 3) batches (e.g. canvas -> crop after
    render -> canvas)."""
    return second[:, :, :2] @ first + np.concatenate([np.zeros((len(first), 2, 2)), second[:, :, 2:]], axis=2)


def fit_vertex_errors(model: FaceModel, decoder: FaceDecoder, faces: pd.DataFrame, masks: np.ndarray,
                      truth: pd.DataFrame, fit: FitSettings, batch_size: int,
                      alignment: str) -> pd.DataFrame:
    """Fit every face of `faces` with `masks` (fit_with_masks) and score against the truth with `model`'s mean
    shape and face region (the model the faces were drawn from; benchmark.synthetic_scores: err_mm etc. per face
    matched)."""
    rows = fit_with_masks(decoder, faces, masks, fit, batch_size)
    return synthetic_scores(truth, rows, model.mean_shape, model.face_region, alignment)


def fit_annotated_nmes(decoder: FaceDecoder, faces: pd.DataFrame, masks: np.ndarray,
                       annotations: dict[Path, Annotation], fit: FitSettings, batch_size: int) -> dict:
    """Fit the annotated photos' faces with `masks` (fit_with_masks) and score them as the evaluate stage does:
    {landmark_nme, landmark_nme_inner (51 points), landmark_nme_count}, NMEs as fractions of the ground-truth box
    size, over the annotated faces found (benchmark.annotated_metrics)."""
    metrics = annotated_metrics(annotated_scores(fit_with_masks(decoder, faces, masks, fit, batch_size),
                                                 annotations))
    return {k: metrics[k] for k in ("landmark_nme", "landmark_nme_inner", "landmark_nme_count")}


def fit_with_masks(decoder: FaceDecoder, faces: pd.DataFrame, masks: np.ndarray, fit: FitSettings,
                   batch_size: int) -> pd.DataFrame:
    """The reconstruction rows of every face of `faces` (preprocessed rows, as in the shards) fitted by `decoder`
    with `masks` (N, S, S) uint8 in place of their own face masks (method fit, as the reconstruct stage does)."""
    check_shape("masks", masks, (len(faces), None, None))
    with_masks = faces.assign(mask=[encode_png(m) for m in masks])
    return pd.DataFrame(reconstruct_faces(decoder, with_masks, "fit", fit, batch_size=batch_size))


def summary(values) -> dict:
    """{mean, median, min} of a 1-D array as JSON floats (None when empty)."""
    values = np.asarray(values, np.float64)
    if not len(values):
        return {"mean": None, "median": None, "min": None}
    return {"mean": float(values.mean()), "median": float(np.median(values)), "min": float(values.min())}
