"""Derive a face model's inner landmark vertices (iBUG 17-67) from dlib's 68 landmarks on the sample photos.

The model files' own landmark vertices (SFM: ibug_to_sfm.txt; ICT: the README's Multi-PIE list) sit 1-3 px (crop
px, ~1 px per mm) off where iBUG/300-W annotators, and dlib's predictor trained on them, put the brow, eye, nose
and mouth points. This re-chooses each inner landmark's vertex so that the landmarks the pipeline outputs agree
with dlib's points on average, alternating with refits:
1. reconstruct every sample face with the reconstruct stage's own per-image fit (params.yaml reconstruct: the
   landmark stage, then the full hybrid loss with its photometric term; on the shards' crops, masks and input
   landmarks), with the built model given by --face-model (its colour model) and the current landmark vertices.
   The full fit matters: the landmark stage alone, with uniform point weights, left the vertices unbiased for
   that fit, but the pipeline's output, fitted with Deep3DFaceRecon's nose and mouth weights and the photometric
   term, still sat 1.9 px RMS (per-landmark bias) off dlib's points on these faces, the nose base ~2.3 % of the
   face box too low;
2. for each inner landmark, among the vertices within --radius-mm of its model-file vertex (mean shape), take
   the one whose projection in those fits is closest to dlib's point on average over the faces (mean squared
   px), left-right symmetric: a mirrored pair of landmarks takes a vertex and its mirror image, scored together,
   and a landmark on the midline (nose, lip centres) a vertex within MIDLINE_MM of it, so that the sample
   faces' poses cannot make the model's landmark layout lopsided;
3. repeat from 1 with the new vertices (--iterations).
The jaw (0-16) keeps its contour vertices: in the 2D convention it slides to the silhouette anyway.
The photos used are the pipeline's own sample faces (data/shards), never the annotated photos the evaluation
scores: those stay held out. The fit's model is --face-model (its geometry must be the model files' as the
face_model stage converts them, params.yaml's face_model paths; ICT: face_model.ict_area) with the model
file's landmarks as the start. Prints the table for FITTED_INNER_LANDMARKS in pipeline/face_model/sfm.py
(--model sfm) or ict.py (--model ict; ICT ids are read_ict's, geometry #0, so the table holds for either area).

Usage (repo root, after `dvc repro albedo`; PYTHONPATH=. so that this tree's pipeline is imported):
    PYTHONPATH=. python scripts/derive_landmarks.py --model sfm [--face-model models/face_model_albedo.npz]
    PYTHONPATH=. python scripts/derive_landmarks.py --model ict --face-model models/face_model_ict.npz
Measured when derived: see FITTED_INNER_LANDMARKS in pipeline/face_model/sfm.py and ict.py.
"""
from __future__ import annotations

import argparse
import glob
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from scipy.spatial import cKDTree

from pipeline.face_model import FaceDecoder, FaceModel, load_face_model
from pipeline.face_model.ict import face_area, ict_face_model, read_ict
from pipeline.face_model.sfm import convert_sfm
from pipeline.reconstruct.fit import FitSettings
from pipeline.reconstruct.parts import coefficient_vectors
from pipeline.reconstruct.stream import reconstruct_faces
from pipeline.train import IBUG_FLIP
from stages import read_params

INNER = range(17, 68)
MIDLINE_MM = 1.0


def mirror_vertices(mean_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each vertex's mirror image across the x = 0 plane: (V,) int64 the closest vertex to it and (V,) float64
    that vertex's distance (mm) from the exact mirror point (0 on a symmetric mesh)."""
    dist, mirror = cKDTree(mean_mm).query(mean_mm * np.array([-1.0, 1.0, 1.0]))
    return mirror.astype(np.int64), dist


def sample_faces(shards: str) -> tuple[pd.DataFrame, np.ndarray]:
    """The shard rows of every face where dlib ran, and (N, 68, 2) float64 crop px their dlib landmarks."""
    table = pd.concat([pd.read_parquet(f) for f in sorted(glob.glob(f"{shards}/*.parquet"))], ignore_index=True)
    points = np.stack(table["dlib_landmarks"].to_numpy()).astype(np.float64).reshape(-1, 68, 2)
    found = np.isfinite(points).all(axis=(1, 2))
    return table[found].reset_index(drop=True), points[found]


def fitted_vertices_px(model: FaceModel, faces: pd.DataFrame, fit: FitSettings) -> tuple[np.ndarray, np.ndarray]:
    """Reconstruct `faces` with the reconstruct stage's fit: (N, V, 2) float64 every vertex's projection and
    (N, 68, 2) float64 the output landmarks (lmk_crop_px), crop px."""
    decoder = FaceDecoder(model)
    rows = pd.DataFrame(reconstruct_faces(decoder, faces, "fit", fit))
    with torch.no_grad():
        verts_px = decoder(torch.from_numpy(coefficient_vectors(rows, decoder.layout))).verts_px[..., :2]
    return verts_px.numpy().astype(np.float64), np.stack(rows["lmk_crop_px"].to_numpy()).reshape(-1, 68, 2)


def start_model(name: str, p: dict) -> tuple[FaceModel, np.ndarray]:
    """The model built with its files' landmarks, and (C,) int64 the table's vertex id of each of its first C
    vertices, the candidates (SFM: all, ids as they are; ICT: the area's mesh vertices without the added eye-hole
    centres, as read_ict's ids)."""
    albedo = tuple(p["sfm_albedo_rgb"])
    if name == "sfm":
        model = convert_sfm(p["sfm_dir"], p["bfm_aux_dir"], albedo, landmarks="model_file")
        return model, np.arange(model.n_verts)
    data = read_ict(p["ict_source"])
    used, _ = face_area(data, p["ict_area"])
    return ict_face_model(data, albedo, p["ict_area"], landmarks="model_file"), used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("sfm", "ict"), required=True)
    ap.add_argument("--params", default="params.yaml",
                    help="face_model's paths (and ict_area) and the reconstruct fit's settings are read from it")
    ap.add_argument("--face-model", default="models/face_model_albedo.npz",
                    help="the built model the fit uses (its colour model; its landmarks are replaced)")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--radius-mm", type=float, default=8.0)
    ap.add_argument("--iterations", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    params = read_params(args.params, "face_model", "reconstruct")
    start_model_file, table_ids = start_model(args.model, params["face_model"])
    model = load_face_model(args.face_model)
    if model.mean_shape.shape != start_model_file.mean_shape.shape or not np.allclose(
            model.mean_shape, start_model_file.mean_shape, atol=1.0e-3):
        raise SystemExit(f"{args.face_model}: its mean shape is not the {args.model} model files' as converted "
                         "(rebuild it: dvc repro albedo)")
    model = replace(model, landmarks=start_model_file.landmarks)
    fit = FitSettings.from_params(params["reconstruct"])
    n_cand = len(table_ids)
    mean = model.mean_shape.astype(np.float64)
    start = model.landmarks.copy()
    mirror, mirror_mm = mirror_vertices(mean[:n_cand])
    near_lmk = np.linalg.norm(mean[:n_cand, None] - mean[None, start[17:]], axis=2).min(1) < args.radius_mm
    print(f"{model.name}: mirror vertex distance from the mirror point: mean {mirror_mm.mean():.3f} mm, within "
          f"{args.radius_mm:g} mm of an inner landmark mean {mirror_mm[near_lmk].mean():.3f} mm, "
          f"max {mirror_mm[near_lmk].max():.3f} mm")
    landmarks = start.copy()
    faces, target = sample_faces(args.shards)
    for iteration in range(args.iterations + 1):
        verts_px, lmk_px = fitted_vertices_px(replace(model, landmarks=landmarks), faces, fit)
        verts_px = verts_px[:, :n_cand]
        residual = lmk_px - target
        rms = np.sqrt((residual[:, 17:] ** 2).sum(-1).mean())
        bias = np.sqrt((residual[:, 17:].mean(0) ** 2).sum(-1).mean())
        print(f"iteration {iteration}: {len(target)} faces, inner residual RMS {rms:.2f} px, bias {bias:.2f} px")
        if iteration == args.iterations:
            break
        for k in INNER:
            pair = IBUG_FLIP[k]
            if pair < k:
                continue  # chosen with its mirror
            near = np.flatnonzero(np.linalg.norm(mean[:n_cand] - mean[start[k]], axis=1) < args.radius_mm)
            if pair == k:
                near = near[np.abs(mean[near, 0]) < MIDLINE_MM]
            error = ((verts_px[:, near] - target[:, None, k]) ** 2).sum(-1).mean(0)
            error = error + ((verts_px[:, mirror[near]] - target[:, None, pair]) ** 2).sum(-1).mean(0)
            landmarks[k] = near[np.argmin(error)]
            landmarks[pair] = mirror[landmarks[k]]
    moved = np.linalg.norm(mean[landmarks[17:]] - mean[start[17:]], axis=1)
    print(f"moved: {(moved > 0).sum()} of 51, mean {moved.mean():.2f} mm, max {moved.max():.2f} mm")
    print("FITTED_INNER_LANDMARKS = (" + ", ".join(str(int(v)) for v in table_ids[landmarks[17:]]) + ")")


if __name__ == "__main__":
    main()
