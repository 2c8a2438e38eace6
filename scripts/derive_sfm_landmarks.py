"""Derive the SFM's inner landmark vertices (iBUG 17-67) from dlib's 68 landmarks on the sample photos.

ibug_to_sfm.txt places the brow, eye, nose and mouth landmarks on vertices that sit 1-3 px (crop px, ~1 px per
mm) off where iBUG/300-W annotators, and dlib's predictor trained on them, put those points: fitted to dlib's
points, the model's residual is mostly such a per-landmark bias (1.56 of 1.94 px RMS on the 28 sample faces).
This re-chooses each inner landmark's vertex so that the model's projection agrees with dlib's points on
average, alternating with refits:
1. fit pose, identity and expression of every sample face to dlib's 68 points (the landmark stage, a weak prior);
2. for each inner landmark, among the vertices within --radius-mm of its ibug_to_sfm vertex (mean shape), take
   the one whose projection is closest to dlib's point on average over the faces (mean squared px), left-right
   symmetric: a mirrored pair of landmarks takes a vertex and its mirror image, scored together, and a landmark
   on the midline (nose, lip centres) a vertex within MIDLINE_MM of it, so that the sample faces' poses cannot
   make the model's landmark layout lopsided;
3. repeat from 1 with the new vertices (--iterations).
The jaw (0-16) keeps its contour vertices: in the 2D convention it slides to the silhouette anyway.
The photos used are the pipeline's own sample faces (data/shards, dlib_landmarks), never the annotated photos the
evaluation scores: those stay held out. Prints the table for pipeline/face_model/sfm.py FITTED_INNER_LANDMARKS.

Usage (repo root, after `dvc repro pack`): python scripts/derive_sfm_landmarks.py
Measured when derived: see FITTED_INNER_LANDMARKS in pipeline/face_model/sfm.py.
"""
from __future__ import annotations

import argparse
import glob
from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from pipeline.face_model import FaceDecoder
from pipeline.face_model.sfm import convert_sfm
from pipeline.reconstruct.fit import fit_to_landmarks
from pipeline.train import IBUG_FLIP

INNER = range(17, 68)
MIDLINE_MM = 1.0


def mirror_vertices(mean_mm: np.ndarray) -> np.ndarray:
    """(V,) int64: each vertex's mirror image across the x = 0 plane (the closest vertex to it)."""
    mirrored = mean_mm * np.array([-1.0, 1.0, 1.0])
    return np.argmin(((mirrored[:, None] - mean_mm[None]) ** 2).sum(-1), axis=1)


def dlib_points(shards: str) -> torch.Tensor:
    """(N, 68, 2) float32 crop px: dlib's landmarks of every shard face where dlib ran."""
    table = pd.concat([pd.read_parquet(f, columns=["dlib_landmarks"]) for f in sorted(glob.glob(f"{shards}/*.parquet"))])
    points = np.stack(table["dlib_landmarks"].to_numpy()).astype(np.float32).reshape(-1, 68, 2)
    return torch.from_numpy(points[np.isfinite(points).all(axis=(1, 2))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--sfm-dir", default="../shared/face_models/sfm")
    ap.add_argument("--bfm-aux-dir", default="../shared/face_models/bfm_aux")
    ap.add_argument("--radius-mm", type=float, default=8.0)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--steps", type=int, default=800)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = convert_sfm(args.sfm_dir, args.bfm_aux_dir, (0.72, 0.53, 0.44), landmarks="ibug_to_sfm")
    mean = model.mean_shape
    start = model.landmarks.copy()
    mirror = mirror_vertices(mean.astype(np.float64))
    landmarks = start.copy()
    target = dlib_points(args.shards)
    for iteration in range(args.iterations + 1):
        decoder = FaceDecoder(replace(model, landmarks=landmarks))
        coeffs = fit_to_landmarks(decoder, decoder.layout.zeros(len(target), torch.device("cpu")), target,
                                  torch.ones(68), args.steps, 5.0e-2, landmark_weight=1.0, coefficient_weight=1.0e-3)
        with torch.no_grad():
            verts_px = decoder(coeffs).verts_px[..., :2].numpy()
            residual = decoder.landmark_px(decoder.layout.split(coeffs)).numpy() - target.numpy()
        rms = np.sqrt((residual[:, 17:] ** 2).sum(-1).mean())
        bias = np.sqrt((residual[:, 17:].mean(0) ** 2).sum(-1).mean())
        print(f"iteration {iteration}: {len(target)} faces, inner residual RMS {rms:.2f} px, bias {bias:.2f} px")
        if iteration == args.iterations:
            break
        for k in INNER:
            pair = IBUG_FLIP[k]
            if pair < k:
                continue  # chosen with its mirror
            near = np.flatnonzero(np.linalg.norm(mean - mean[start[k]], axis=1) < args.radius_mm)
            if pair == k:
                near = near[np.abs(mean[near, 0]) < MIDLINE_MM]
            error = ((verts_px[:, near] - target.numpy()[:, None, k]) ** 2).sum(-1).mean(0)
            error = error + ((verts_px[:, mirror[near]] - target.numpy()[:, None, pair]) ** 2).sum(-1).mean(0)
            landmarks[k] = near[np.argmin(error)]
            landmarks[pair] = mirror[landmarks[k]]
    moved = np.linalg.norm(mean[landmarks[17:]] - mean[start[17:]], axis=1)
    print(f"moved: mean {moved.mean():.2f} mm, max {moved.max():.2f} mm")
    print("FITTED_INNER_LANDMARKS = (" + ", ".join(str(int(v)) for v in landmarks[17:]) + ")")


if __name__ == "__main__":
    main()
