"""Scoring reconstructions against ground truth: per-face tables and the summary metrics of `reports/metrics.json`.

Inputs are the tables the stages write: `coefficients.parquet` of `stages.reconstruct` (one row per detected
face: source, verts_model, lmk_px, dlib_lmk_px, masked_psnr, ...) and `truth.parquet` of `stages.synth`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .metrics import aligned_vertex_error, check_shape, landmark_nme, region_error_stats

N_LANDMARKS = 68
YAW_BINS_DEG = (0.0, 20.0, 40.0, 90.0)
SYNTHETIC_COLUMNS = ["file", "yaw_deg", "recon_row", "err_mm", "err_median_mm", "err_meanface_mm", "nme", "nme_dlib",
                     "masked_psnr"]


def stack_column(column: pd.Series, shape: tuple[int, ...]) -> np.ndarray:
    """A column of flat lists (one per row) -> (rows, *shape) float64; ValueError names the column on a bad size."""
    try:
        return np.stack([np.asarray(x, np.float64).reshape(shape) for x in column]) if len(column) else \
            np.zeros((0,) + shape)
    except ValueError:
        raise ValueError(f"column {column.name!r}: expected {int(np.prod(shape))} values per row") from None


def pick_faces(recon: pd.DataFrame, keys: pd.Series, gt_lmk_px: dict[str, np.ndarray]) -> dict[str, int]:
    """{key: row label in `recon`} for each key of gt_lmk_px ((68, 2) px ground truth) that has reconstructions.

    keys: (rows of recon,) the key of each reconstruction row (e.g. its image file name). Where an image gave
    several faces, the one whose detected (dlib) landmarks' centroid is nearest the ground truth's centroid is
    the annotated face; the others are other people or false detections."""
    chosen = {}
    if recon.empty:  # a run that detected no face writes a table without columns
        return chosen
    dlib = stack_column(recon["dlib_lmk_px"], (N_LANDMARKS, 2)).mean(axis=1)
    for key, gt in gt_lmk_px.items():
        rows = np.flatnonzero(keys.to_numpy() == key)
        if len(rows):
            nearest = rows[np.argmin(np.linalg.norm(dlib[rows] - gt.mean(axis=0), axis=1))]
            chosen[key] = recon.index[nearest]
    return chosen


def face_vertex_errors(pred_mm: np.ndarray, gt_mm: np.ndarray, weights: np.ndarray, mode: str) -> np.ndarray:
    """Per-face (mean, median) aligned vertex error: pred_mm, gt_mm (N, V, 3) mm; weights (V,) the face region used
    for both the alignment and the statistics; mode 'rigid' | 'similarity'. Returns (N, 2) mm."""
    check_shape("gt_mm", gt_mm, (None, weights.shape[0], 3))
    check_shape("pred_mm", pred_mm, gt_mm.shape)
    out = [region_error_stats(aligned_vertex_error(p, g, weights, mode), weights) for p, g in zip(pred_mm, gt_mm)]
    return np.asarray(out, np.float64).reshape(-1, 2)


def synthetic_scores(truth: pd.DataFrame, recon: pd.DataFrame, mean_shape_mm: np.ndarray, face_region: np.ndarray,
                     mode: str) -> pd.DataFrame:
    """One row per synthetic face that was reconstructed, matched by image file name (truth `file` == name of the
    reconstruction's `source`).

    mean_shape_mm: (V, 3) the model's mean face (the 'predict the mean' baseline); face_region: (V,) weights.
    Columns: file, yaw_deg, recon_row (label in recon), err_mm / err_median_mm (ours), err_meanface_mm,
    nme (our projected landmarks), nme_dlib (the detector's), all against the truth's landmarks (canvas px)."""
    gt_lmk = stack_column(truth["lmk_px"], (N_LANDMARKS, 2))
    by_file = dict(zip(truth["file"], gt_lmk))
    if recon.empty:
        return pd.DataFrame(columns=SYNTHETIC_COLUMNS)
    chosen = pick_faces(recon, recon["source"].map(lambda s: Path(s).name), by_file)
    t = truth[truth["file"].isin(list(chosen))]
    r = recon.loc[[chosen[f] for f in t["file"]]]
    v = len(face_region)
    gt_mm = stack_column(t["verts_model"], (v, 3))
    ours = face_vertex_errors(stack_column(r["verts_model"], (v, 3)), gt_mm, face_region, mode)
    meanface = face_vertex_errors(np.broadcast_to(mean_shape_mm, gt_mm.shape), gt_mm, face_region, mode)
    gt = stack_column(t["lmk_px"], (N_LANDMARKS, 2))
    return pd.DataFrame({
        "file": t["file"].to_numpy(), "yaw_deg": t["yaw_deg"].to_numpy(), "recon_row": r.index.to_numpy(),
        "err_mm": ours[:, 0], "err_median_mm": ours[:, 1], "err_meanface_mm": meanface[:, 0],
        "nme": landmark_nme(stack_column(r["lmk_px"], (N_LANDMARKS, 2)), gt),
        "nme_dlib": landmark_nme(stack_column(r["dlib_lmk_px"], (N_LANDMARKS, 2)), gt),
        "masked_psnr": r["masked_psnr"].to_numpy(np.float64),
    })


def add_peer_scores(scores: pd.DataFrame, truth: pd.DataFrame, peer_verts_mm: np.ndarray, peer_lmk_px: np.ndarray,
                    peer_seconds: np.ndarray, face_region: np.ndarray, mode: str) -> pd.DataFrame:
    """`scores` with the peer's columns err_eos_mm, err_eos_median_mm, nme_eos, eos_seconds added.

    peer_verts_mm: (N, V, 3) mm in any frame; peer_lmk_px: (N, 68, 2) canvas px; peer_seconds: (N,), all in the
    order of scores' rows."""
    gt = truth.set_index("file").loc[scores["file"]]
    v = len(face_region)
    errors = face_vertex_errors(np.asarray(peer_verts_mm, np.float64), stack_column(gt["verts_model"], (v, 3)),
                                face_region, mode)
    return scores.assign(err_eos_mm=errors[:, 0], err_eos_median_mm=errors[:, 1],
                         nme_eos=landmark_nme(peer_lmk_px, stack_column(gt["lmk_px"], (N_LANDMARKS, 2))),
                         eos_seconds=np.asarray(peer_seconds, np.float64))


def annotated_scores(recon: pd.DataFrame, annotations: dict[Path, np.ndarray],
                     landmark_floor: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> pd.DataFrame:
    """One row per annotated image: image, detected (bool), nme and nme_dlib (NaN where no face was detected).
    annotations: {image path: (68, 2) px ground truth}; reconstructions match by resolved source path.
    landmark_floor (model_landmark_floor with its decoder bound): given, the column nme_model_floor holds the NME
    of the face model's own landmarks fitted to the ground truth, the floor under nme (one batched call)."""
    gt_by_key = {str(Path(p).resolve()): gt for p, gt in annotations.items()}
    keys = recon["source"].map(lambda s: str(Path(s).resolve())) if not recon.empty else pd.Series([], dtype=str)
    chosen = pick_faces(recon, keys, gt_by_key)
    rows = []
    for key, gt in gt_by_key.items():
        nme = nme_dlib = np.nan
        if key in chosen:
            row = recon.loc[chosen[key]]
            nme, nme_dlib = (float(landmark_nme(np.asarray(row[c], np.float64).reshape(1, N_LANDMARKS, 2), gt[None])[0])
                             for c in ("lmk_px", "dlib_lmk_px"))
        rows.append({"image": Path(key).name, "detected": key in chosen, "nme": nme, "nme_dlib": nme_dlib})
    scores = pd.DataFrame(rows, columns=["image", "detected", "nme", "nme_dlib"])
    if landmark_floor is not None:
        found = [key for key in gt_by_key if key in chosen]
        floor = np.full(len(scores), np.nan)
        if found:
            gt = np.stack([gt_by_key[key] for key in found])
            fitted = landmark_floor(gt, stack_column(recon.loc[[chosen[key] for key in found], "transform"], (2, 3)))
            floor[scores.index[scores["detected"]]] = landmark_nme(fitted, gt)
        scores["nme_model_floor"] = floor
    return scores


def _mean(values) -> float | None:
    """Mean as a JSON-ready float, None when there is nothing to average."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def synthetic_metrics(scores: pd.DataFrame, n_truth: int, our_seconds_per_face: float | None) -> dict:
    """Summary of the synthetic benchmark. scores: synthetic_scores (+ add_peer_scores) rows; n_truth: synthetic
    faces generated (the difference to len(scores) were missed by the detector); our_seconds_per_face: the
    reconstruction's wall time per face. Errors in mm; speed ratio = our s/face over eos's s/face (> 1: slower)."""
    ours, eos = _mean(scores["err_mm"]), _mean(scores.get("err_eos_mm", []))
    eos_seconds = _mean(scores.get("eos_seconds", []))
    out = {
        "synthetic_faces": int(n_truth), "synthetic_faces_missed": int(n_truth - len(scores)),
        "synthetic_vertex_error_mm": ours,
        "synthetic_vertex_error_median_mm": _mean(scores["err_median_mm"]),
        "synthetic_vertex_error_mm_eos": eos,
        "synthetic_vertex_error_median_mm_eos": _mean(scores.get("err_eos_median_mm", [])),
        "synthetic_vertex_error_mm_meanface": _mean(scores["err_meanface_mm"]),
        "vertex_error_vs_eos": _ratio(ours, eos),
        "fit_seconds_per_face": our_seconds_per_face, "fit_seconds_per_face_eos": eos_seconds,
        "fit_speed_vs_eos": _ratio(our_seconds_per_face, eos_seconds),
        "synthetic_landmark_nme": _mean(scores["nme"]), "synthetic_landmark_nme_dlib": _mean(scores["nme_dlib"]),
        "synthetic_landmark_nme_eos": _mean(scores.get("nme_eos", [])),
        "synthetic_masked_psnr": _mean(scores["masked_psnr"]),
    }
    by_yaw = {}
    for lo, hi in zip(YAW_BINS_DEG[:-1], YAW_BINS_DEG[1:]):
        in_bin = scores[(scores["yaw_deg"].abs() >= lo) & (scores["yaw_deg"].abs() < hi)]
        by_yaw[f"yaw_{lo:.0f}_{hi:.0f}"] = {"faces": len(in_bin), "ours": _mean(in_bin["err_mm"]),
                                            "eos": _mean(in_bin.get("err_eos_mm", []))}
    out["synthetic_vertex_error_mm_by_yaw"] = by_yaw
    return out


def annotated_metrics(scores: pd.DataFrame) -> dict:
    """Summary of annotated_scores: mean NME (ours, dlib, and the model floor when scored) over detected faces;
    undetected faces are counted in landmark_nme_missed (the count of evaluated faces is landmark_nme_count)."""
    found = scores[scores["detected"]]
    return {"landmark_nme": _mean(found["nme"]), "landmark_nme_dlib": _mean(found["nme_dlib"]),
            "landmark_nme_model_floor": _mean(found.get("nme_model_floor", [])),
            "landmark_nme_count": int(len(found)), "landmark_nme_missed": int(len(scores) - len(found))}

