"""Scoring reconstructions against ground truth: per-face tables and the summary metrics of `reports/metrics.json`.

Inputs are the tables the stages write: the reconstruction table of `stages.reconstruct`
(pipeline.reconstruct.parts.read_reconstructions: one row per detected face; verts_model stored or rebuilt from
the coefficients) and `truth.parquet` of `stages.synth`. Landmark columns of a reconstruction row, each a flat list of
68 x 2 photo px: lmk_px (ours, jaw on the 2D silhouette: the iBUG / 300-W `.pts` convention), lmk3d_px (ours,
the fixed 3D landmark vertices projected: the AFLW2000-3D `.mat` convention), input_lmk_px (the points the fit
used as its target), dlib_lmk_px and mesh_lmk_px (the single detectors; all-NaN where one did not run).
Older tables may lack some of them: see landmark_column.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd

from .annotations import Annotation
from .metrics import INNER_POINTS, aligned_vertex_error, check_shape, landmark_nme, region_error_stats
from .model_comparison import surface_errors

N_LANDMARKS = 68
# A reconstruction whose face box overlaps the ground truth's box less than this (IoU) is another face or a
# false detection, not the annotated face. A box of the face's size offset by a third of its width still has
# IoU 0.5; a box twice as wide and tall around the face has 0.25, a neighbouring face none.
MIN_FACE_IOU = 0.3
# Missing landmark columns in older tables: the fit's target was dlib's points; ours had no 3D-convention set.
FALLBACK_COLUMNS = {"input_lmk_px": "dlib_lmk_px", "lmk3d_px": "lmk_px"}
OURS_BY_FORMAT = {"pts": "lmk_px", "mat": "lmk3d_px"}  # our landmarks in each annotation's convention
LANDMARK_SOURCES = {"dlib": "dlib_lmk_px", "mesh": "mesh_lmk_px", "input": "input_lmk_px"}
SINGLE_INPUTS = ("dlib", "mesh")  # the detectors; input_lmk_px is what the fit used, possibly built from both
NME_COLUMNS = [f"nme{part}{suffix}" for suffix in ["", *(f"_{s}" for s in LANDMARK_SOURCES)]
               for part in ("", "_inner")]
YAW_BINS_DEG = (0.0, 30.0, 60.0, 90.0)
NME_FAILURE = 0.10          # a face whose landmark NME exceeds this counts as a failure
FAILURE_YAW_MAX_DEG = 75.0  # ... also counted up to this |yaw| only, short of the profiles
SYNTHETIC_COLUMNS = ["file", "yaw_deg", "recon_row", "iou", "err_mm", "err_median_mm", "err_meanface_mm",
                     *NME_COLUMNS, "masked_psnr"]


def stack_column(column: pd.Series, shape: tuple[int, ...]) -> np.ndarray:
    """A column of flat lists (one per row) -> (rows, *shape) float64; ValueError names the column on a bad size."""
    try:
        return np.stack([np.asarray(x, np.float64).reshape(shape) for x in column]) if len(column) else \
            np.zeros((0,) + shape)
    except ValueError:
        raise ValueError(f"column {column.name!r}: expected {int(np.prod(shape))} values per row") from None


def landmark_column(recon: pd.DataFrame, name: str) -> np.ndarray:
    """(rows, 68, 2) float64 photo px of the landmark column `name` of recon. A table without it uses
    FALLBACK_COLUMNS[name] (older tables), else all NaN (a source that never ran: its scores are NaN)."""
    if name in recon:
        return stack_column(recon[name], (N_LANDMARKS, 2))
    if name in FALLBACK_COLUMNS:
        return landmark_column(recon, FALLBACK_COLUMNS[name])
    return np.full((len(recon), N_LANDMARKS, 2), np.nan)


def landmark_boxes(lmk_px: np.ndarray) -> np.ndarray:
    """(N, K, 2) px -> (N, 4) bounding boxes (x0, y0, x1, y1) px; NaN for a face with a NaN point."""
    return np.concatenate([lmk_px.min(axis=1), lmk_px.max(axis=1)], axis=1)


def box_iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Intersection over union (N,) in [0, 1] of boxes (N, 4) with box (4,), all (x0, y0, x1, y1) px; a NaN or
    empty box overlaps nothing (0)."""
    lo, hi = np.maximum(boxes[:, :2], box[:2]), np.minimum(boxes[:, 2:], box[2:])
    inter = np.prod(np.clip(hi - lo, 0.0, None), axis=1)
    union = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1) + np.prod(box[2:] - box[:2]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.nan_to_num(inter / union, nan=0.0)


class FaceMatch(NamedTuple):
    """The reconstruction that overlaps a ground-truth face most."""
    row: object  # its row label in the reconstruction table
    iou: float   # IoU of its face box with the ground truth's box

    @property
    def found(self) -> bool:
        """Whether the row is that face (iou >= MIN_FACE_IOU) rather than a neighbour or a false detection."""
        return self.iou >= MIN_FACE_IOU


def pick_faces(recon: pd.DataFrame, gt_lmk_px: dict[str, np.ndarray],
               key_of: Callable[[str], str]) -> dict[str, FaceMatch]:
    """{key: FaceMatch} for each key of gt_lmk_px ((68, 2) px ground truth) that has reconstructions.

    key_of: a reconstruction's `source` -> its key (e.g. the image file name). A row's face box is the bounding
    box of its input_lmk_px (the landmarks the fit used); the match is the row whose box has the highest IoU with
    the box of the ground-truth points. Overlap, not distance or size: an image's other faces may be larger or
    nearer its centre. The match may still be too far off to be the face: see FaceMatch.found."""
    if recon.empty:  # a run that detected no face writes a table without columns
        return {}
    keys = recon["source"].map(key_of).to_numpy()
    boxes = landmark_boxes(landmark_column(recon, "input_lmk_px"))
    chosen = {}
    for key, gt in gt_lmk_px.items():
        rows = np.flatnonzero(keys == key)
        if len(rows):
            iou = box_iou(boxes[rows], landmark_boxes(gt[None])[0])
            chosen[key] = FaceMatch(recon.index[rows[np.argmax(iou)]], float(iou.max()))
    return chosen


def landmark_nmes(ours_px: np.ndarray, rows: pd.DataFrame, gt_px: np.ndarray) -> dict[str, np.ndarray]:
    """{column of NME_COLUMNS: (N,)}: the full and inner-51 NME of ours_px (N, 68, 2) photo px and of each
    LANDMARK_SOURCES column of rows (N reconstruction rows), against gt_px (N, 68, 2) photo px. The inner score
    is normalised by the box of all 68 ground-truth points (landmark_nme)."""
    preds = {"": ours_px, **{f"_{s}": landmark_column(rows, c) for s, c in LANDMARK_SOURCES.items()}}
    out = {}
    for suffix, pred in preds.items():
        out[f"nme{suffix}"] = landmark_nme(pred, gt_px)
        out[f"nme_inner{suffix}"] = landmark_nme(pred, gt_px, INNER_POINTS)
    return out


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
    reconstruction's `source`) and face box overlap (pick_faces).

    mean_shape_mm: (V, 3) the model's mean face (the 'predict the mean' baseline); face_region: (V,) weights.
    Columns SYNTHETIC_COLUMNS: file, yaw_deg, recon_row (label in recon), iou, err_mm / err_median_mm (ours),
    err_meanface_mm, the NME_COLUMNS (ours: lmk_px, since the truth's jaw is on the silhouette too; each source's
    NaN where its column is missing) against the truth's landmarks (canvas px), masked_psnr."""
    gt_lmk = stack_column(truth["lmk_px"], (N_LANDMARKS, 2))
    matches = pick_faces(recon, dict(zip(truth["file"], gt_lmk)), lambda source: Path(source).name)
    chosen = {f: m for f, m in matches.items() if m.found}
    if not chosen:
        return pd.DataFrame(columns=SYNTHETIC_COLUMNS)
    t = truth[truth["file"].isin(list(chosen))]
    r = recon.loc[[chosen[f].row for f in t["file"]]]
    v = len(face_region)
    gt_mm = stack_column(t["verts_model"], (v, 3))
    ours = face_vertex_errors(stack_column(r["verts_model"], (v, 3)), gt_mm, face_region, mode)
    meanface = face_vertex_errors(np.broadcast_to(mean_shape_mm, gt_mm.shape), gt_mm, face_region, mode)
    return pd.DataFrame({
        "file": t["file"].to_numpy(), "yaw_deg": t["yaw_deg"].to_numpy(), "recon_row": r.index.to_numpy(),
        "iou": [chosen[f].iou for f in t["file"]],
        "err_mm": ours[:, 0], "err_median_mm": ours[:, 1], "err_meanface_mm": meanface[:, 0],
        **landmark_nmes(landmark_column(r, "lmk_px"), r, stack_column(t["lmk_px"], (N_LANDMARKS, 2))),
        "masked_psnr": r["masked_psnr"].to_numpy(np.float64),
    })


def add_peer_scores(scores: pd.DataFrame, truth: pd.DataFrame, peer_verts_mm: np.ndarray, peer_lmk_px: np.ndarray,
                    peer_seconds: np.ndarray, face_region: np.ndarray, mode: str) -> pd.DataFrame:
    """`scores` with the peer's columns err_eos_mm, err_eos_median_mm, nme_eos, eos_seconds added.

    peer_verts_mm: (N, U, 3) mm in any frame; peer_lmk_px: (N, 68, 2) canvas px; peer_seconds: (N,), all in the
    order of scores' rows; face_region: (V,) of the model that drew the truth. The vertex errors need the peer's
    mesh to have the truth's vertices (U == V); a peer of another topology (eos's SFM on faces drawn by ICT) gets
    NaN there, its shape is scored by add_surface_scores."""
    gt = truth.set_index("file").loc[scores["file"]]
    v = len(face_region)
    peer_verts_mm = np.asarray(peer_verts_mm, np.float64)
    check_shape("peer_verts_mm", peer_verts_mm, (len(scores), None, 3))
    if peer_verts_mm.shape[1] == v:
        errors = face_vertex_errors(peer_verts_mm, stack_column(gt["verts_model"], (v, 3)), face_region, mode)
    else:
        errors = np.full((len(scores), 2), np.nan)
    return scores.assign(err_eos_mm=errors[:, 0], err_eos_median_mm=errors[:, 1],
                         nme_eos=landmark_nme(peer_lmk_px, stack_column(gt["lmk_px"], (N_LANDMARKS, 2))),
                         eos_seconds=np.asarray(peer_seconds, np.float64))


def add_surface_scores(scores: pd.DataFrame, truth: pd.DataFrame, recon: pd.DataFrame, drawer, fitter,
                       peer_verts_mm: np.ndarray, peer) -> pd.DataFrame:
    """`scores` with surface_mm (ours) and surface_eos_mm (the peer's) added: the model-agnostic surface error
    (model_comparison.surface_errors: inner-landmark rigid alignment, then each compared truth point's distance to
    the predicted surface, mm), which scores a mesh of any topology against the truth.

    drawer, fitter, peer: the FaceModels (landmarks, face_region, triangles) that drew the truth, that our
    reconstructions in recon (verts_model) are meshes of, and of the peer's meshes peer_verts_mm (N, U, 3) mm,
    in the order of scores' rows."""
    gt = stack_column(truth.set_index("file").loc[scores["file"], "verts_model"], (drawer.n_verts, 3))
    ours = stack_column(recon.loc[scores["recon_row"], "verts_model"], (fitter.n_verts, 3))
    peer_verts_mm = np.asarray(peer_verts_mm, np.float64)
    check_shape("peer_verts_mm", peer_verts_mm, (len(scores), peer.n_verts, 3))
    region = (drawer.landmarks, drawer.face_region)
    return scores.assign(
        surface_mm=surface_errors(gt, *region, ours, fitter.triangles, fitter.landmarks),
        surface_eos_mm=surface_errors(gt, *region, peer_verts_mm, peer.triangles, peer.landmarks))


def our_landmarks(rows: pd.DataFrame, formats: list[str]) -> np.ndarray:
    """(N, 68, 2) photo px: each of the N reconstruction rows' landmarks in the convention of its annotation
    format (OURS_BY_FORMAT: lmk_px for "pts", lmk3d_px for "mat")."""
    by_column = {c: landmark_column(rows, c) for c in set(OURS_BY_FORMAT.values())}
    return np.stack([by_column[OURS_BY_FORMAT[f]][i] for i, f in enumerate(formats)])


def annotated_scores(recon: pd.DataFrame, annotations: dict[Path, Annotation],
                     landmark_floor: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> pd.DataFrame:
    """One row per annotated image: image, format, detected (bool: a reconstruction overlaps the annotated face,
    pick_faces), iou (of the best-overlapping reconstruction; NaN without any), and the NME_COLUMNS (NaN where
    the face was missed or a source did not run). Ours is compared in the annotation's convention (our_landmarks).
    annotations: {image path: Annotation}; reconstructions match by resolved source path, then by overlap.
    landmark_floor (model_landmark_floor with its decoder bound): given, the column nme_model_floor holds the NME
    of the face model's own landmarks fitted to the ground truth, the floor under nme (one batched call)."""
    notes = {str(Path(p).resolve()): a for p, a in annotations.items()}
    matches = pick_faces(recon, {k: a.lmk_px for k, a in notes.items()}, lambda source: str(Path(source).resolve()))
    found = [k for k in notes if k in matches and matches[k].found]
    scores = pd.DataFrame({"image": [Path(k).name for k in notes], "format": [a.format for a in notes.values()],
                           "detected": [k in found for k in notes],
                           "iou": [matches[k].iou if k in matches else np.nan for k in notes],
                           **{c: np.full(len(notes), np.nan) for c in NME_COLUMNS}})
    if landmark_floor is not None:
        scores["nme_model_floor"] = np.nan
    if not found:
        return scores
    rows = recon.loc[[matches[k].row for k in found]]
    gt = np.stack([notes[k].lmk_px for k in found])
    detected = scores.index[scores["detected"]]
    for column, values in landmark_nmes(our_landmarks(rows, [notes[k].format for k in found]), rows, gt).items():
        scores.loc[detected, column] = values
    if landmark_floor is not None:
        fitted = landmark_floor(gt, stack_column(rows["transform"], (2, 3)))
        scores.loc[detected, "nme_model_floor"] = landmark_nme(fitted, gt)
    return scores


def _mean(values) -> float | None:
    """Mean as a JSON-ready float, None when there is nothing to average."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def yaw_bins(yaw_deg: np.ndarray) -> np.ndarray:
    """(N,) int: the YAW_BINS_DEG interval [lo, hi) holding each |yaw_deg| (N,) degrees. A |yaw| at or past the
    last edge counts in the last bin (90 deg comes back as 90.000002 from the float32 coefficients)."""
    edges = np.asarray(YAW_BINS_DEG)
    return np.clip(np.searchsorted(edges, np.abs(yaw_deg), side="right") - 1, 0, len(edges) - 2)


def synthetic_by_yaw(scores: pd.DataFrame, truth_yaw_deg: np.ndarray) -> dict:
    """{"yaw_0_30": {...}, ...} per |yaw| bin: faces (generated, from the truth's yaw, so missed faces count),
    detected, detection_rate, the mean nme (ours), nme_dlib, nme_mesh, nme_input, vertex_error_mm (ours) and
    vertex_error_mm_eos (mm) over its detected faces. scores: synthetic_scores (+ add_peer_scores) rows."""
    truth_bin = yaw_bins(np.asarray(truth_yaw_deg, np.float64))
    score_bin = yaw_bins(scores["yaw_deg"].to_numpy(np.float64))
    out = {}
    for b, (lo, hi) in enumerate(zip(YAW_BINS_DEG[:-1], YAW_BINS_DEG[1:])):
        in_bin, faces = scores[score_bin == b], int((truth_bin == b).sum())
        out[f"yaw_{lo:.0f}_{hi:.0f}"] = {
            "faces": faces, "detected": len(in_bin), "detection_rate": _ratio(len(in_bin), faces),
            **{c: _mean(in_bin.get(c, [])) for c in ("nme", "nme_dlib", "nme_mesh", "nme_input")},
            "vertex_error_mm": _mean(in_bin["err_mm"]), "vertex_error_mm_eos": _mean(in_bin.get("err_eos_mm", []))}
    return out


def synthetic_metrics(scores: pd.DataFrame, truth_yaw_deg: np.ndarray, our_seconds_per_face: float | None) -> dict:
    """Summary of the synthetic benchmark. scores: synthetic_scores (+ add_peer_scores) rows; truth_yaw_deg: (N,)
    the yaw of every synthetic face generated, degrees (the faces not in scores were missed by the detector);
    our_seconds_per_face: the reconstruction's wall time per face. Errors in mm: vertex errors (the truth's
    topology only: None for eos on faces another model drew) and surface errors (add_surface_scores, any topology;
    None without those columns); speed ratio = our s/face over eos's s/face (> 1: slower).
    synthetic_faces_nme_over_10pct: detected faces whose NME exceeds NME_FAILURE, also counted up to
    FAILURE_YAW_MAX_DEG of |yaw| only (..._upto_75deg); synthetic_by_yaw: per yaw bin."""
    n_truth = len(truth_yaw_deg)
    ours, eos = _mean(scores["err_mm"]), _mean(scores.get("err_eos_mm", []))
    surface, surface_eos = _mean(scores.get("surface_mm", [])), _mean(scores.get("surface_eos_mm", []))
    eos_seconds = _mean(scores.get("eos_seconds", []))
    failed = scores["nme"].to_numpy(np.float64) > NME_FAILURE
    short_of_profile = np.abs(scores["yaw_deg"].to_numpy(np.float64)) <= FAILURE_YAW_MAX_DEG
    return {
        "synthetic_faces": int(n_truth), "synthetic_faces_missed": int(n_truth - len(scores)),
        "synthetic_vertex_error_mm": ours,
        "synthetic_vertex_error_median_mm": _mean(scores["err_median_mm"]),
        "synthetic_vertex_error_mm_eos": eos,
        "synthetic_vertex_error_median_mm_eos": _mean(scores.get("err_eos_median_mm", [])),
        "synthetic_vertex_error_mm_meanface": _mean(scores["err_meanface_mm"]),
        "vertex_error_vs_eos": _ratio(ours, eos),
        "synthetic_surface_error_mm": surface, "synthetic_surface_error_mm_eos": surface_eos,
        "surface_error_vs_eos": _ratio(surface, surface_eos),
        "fit_seconds_per_face": our_seconds_per_face, "fit_seconds_per_face_eos": eos_seconds,
        "fit_speed_vs_eos": _ratio(our_seconds_per_face, eos_seconds),
        "synthetic_landmark_nme": _mean(scores["nme"]),
        **{f"synthetic_landmark_nme_{s}": _mean(scores.get(f"nme_{s}", [])) for s in (*LANDMARK_SOURCES, "eos")},
        "synthetic_faces_nme_over_10pct": int(failed.sum()),
        "synthetic_faces_nme_over_10pct_upto_75deg": int((failed & short_of_profile).sum()),
        "synthetic_masked_psnr": _mean(scores["masked_psnr"]),
        "synthetic_by_yaw": synthetic_by_yaw(scores, truth_yaw_deg),
    }


def annotated_metrics(scores: pd.DataFrame) -> dict:
    """Summary of annotated_scores over the detected faces: the mean of each NME column as landmark_<column>
    (landmark_nme, landmark_nme_inner, landmark_nme_dlib, landmark_nme_inner_dlib, ... _mesh, _input; a source's
    mean is over the faces it ran on), landmark_nme_inner_best_input (the lower of the single detectors' mean inner
    NME, SINGLE_INPUTS: the one to beat), landmark_nme_model_floor when scored; landmark_nme_count faces
    evaluated, landmark_nme_missed annotated faces that no reconstruction overlaps."""
    found = scores[scores["detected"]]
    out = {f"landmark_{c}": _mean(found[c]) for c in NME_COLUMNS}
    singles = [out[f"landmark_nme_inner_{s}"] for s in SINGLE_INPUTS]
    out["landmark_nme_inner_best_input"] = min((v for v in singles if v is not None), default=None)
    out.update(landmark_nme_model_floor=_mean(found.get("nme_model_floor", [])),
               landmark_nme_count=int(len(found)), landmark_nme_missed=int(len(scores) - len(found)))
    return out
