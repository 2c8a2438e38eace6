"""Stage `evaluate`: ground-truth benchmarks with the eos peer in the same run -> reports/metrics.json.

- Synthetic benchmark: data/synth/truth.parquet vs the `reconstruct_synth` output (the full path: detection,
  alignment, fitting). eos fits the dlib landmarks that reconstruction recorded (`dlib_lmk_px`; the fit's own
  `input_lmk_px` on a face dlib did not run on), so both methods see the same detections; its SFM landmark
  vertices, triangles and face region come from evaluate.sfm_model, whatever face_model.source. Vertex errors:
  per face, the mean (and median) distance over the face region after a Procrustes alignment
  (evaluate.alignment), then the mean over faces; eos's only when the synthetic faces were drawn by the SFM (its
  topology). Surface errors (ours and eos's, any topology): model_comparison.surface_errors. Also per |yaw| bin
  (synthetic_by_yaw: faces, detected, NMEs, vertex errors), and the count of faces whose landmark NME exceeds 10%
  (all, and up to 75 deg of yaw).
- Annotated photos (evaluate.annotations, .pts/.mat): the annotated face is the reconstruction that overlaps
  its ground-truth box most (IoU, at least benchmark.MIN_FACE_IOU; else it counts in landmark_nme_missed).
  Landmark NME (all 68 points, and the inner 51) of ours in the annotation's convention (.pts: lmk_px, jaw on
  the silhouette; .mat: lmk3d_px, fixed 3D points), of dlib's, the face mesh's and the fit's input, from the
  `reconstruct_annotated` output; landmark_nme_inner_best_input: the better single detector's inner NME, the
  one to beat. landmark_nme_model_floor: the face model's own landmarks fitted to the ground truth (no prior),
  the floor under any reconstruction's landmark_nme with that model.
- Real photos: masked PSNR, the mean of the `reconstruct` stage's per-face values.
- model_comparison: the `model_comparison` stage's report (SFM vs ICT on the same faces), copied in whole.

Direction of the ratios: vertex_error_vs_eos, surface_error_vs_eos = ours / eos (< 1: we are more accurate);
fit_speed_vs_eos = our reconstruction s/face over eos's s/face (< 1: we are faster). Our time is the reconstruct
stage's own wall time per face (fitting + output files, preprocessing excluded); eos's is its fit alone.
Per-face numbers go to reports/evaluate_faces.csv.
"""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.evaluate.annotations import find_annotations
from pipeline.evaluate.benchmark import (add_peer_scores, add_surface_scores, annotated_metrics, annotated_scores,
                                         landmark_column, synthetic_metrics, synthetic_scores)
from pipeline.evaluate.eos_baseline import SFM_VERTS, EosFitter
from pipeline.evaluate.landmark_floor import model_landmark_floor
from pipeline.face_model import FaceDecoder, FaceModel, load_face_model
from pipeline.host_memory import keep_freed_memory
from pipeline.reconstruct.parts import meshes_from_coefficients, read_reconstructions
from stages import read_params


def seconds_per_face(summary_path: Path) -> float | None:
    """Wall time per face from a reconstruct summary.json ({faces, seconds, ...}); None if it has no faces."""
    summary = json.loads(summary_path.read_text())
    return summary["seconds"] / summary["faces"] if summary.get("faces") else None


def synthetic_reconstructions(folder: Path) -> tuple[pd.DataFrame, FaceModel]:
    """The reconstruct_synth table with verts_model ((V*3,) float32 mm per face: stored when
    reconstruct.write_vertices was on, else decoded from the coefficients), and the face model the run used."""
    recon = read_reconstructions(folder)
    model = load_face_model(json.loads((folder / "summary.json").read_text())["face_model"])
    if "verts_model" not in recon.columns:
        recon["verts_model"] = list(meshes_from_coefficients(FaceDecoder(model), recon).reshape(len(recon), -1))
    return recon, model


def run_eos(scores: pd.DataFrame, truth: pd.DataFrame, recon: pd.DataFrame, fitter: EosFitter) -> tuple:
    """eos on each scored face's recorded landmarks: (verts (N, 3448, 3) mm, lmk (N, 68, 2) px, seconds (N,)).

    dlib's 68 (dlib_lmk_px), the detector eos is built for; a face dlib did not run on (all NaN) gets the points
    our fit used instead (input_lmk_px), so the peer still fits every scored face."""
    canvas = truth.set_index("file").loc[scores["file"], "canvas_px"].to_numpy()
    rows = recon.loc[scores["recon_row"]]
    dlib = landmark_column(rows, "dlib_lmk_px")
    lmk = np.where(np.isnan(dlib).any(axis=(1, 2), keepdims=True), landmark_column(rows, "input_lmk_px"), dlib)
    fits = [fitter.fit(points, int(size), int(size)) for points, size in zip(lmk, canvas)]
    return (np.stack([f.verts_mm for f in fits]).reshape(-1, SFM_VERTS, 3), np.stack([f.lmk_px for f in fits]),
            np.array([f.seconds for f in fits]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--synth", type=Path, default=Path("data/synth"), help="truth.parquet + reconstructions/")
    ap.add_argument("--annotated", type=Path, default=Path("data/annotated/reconstructions"))
    ap.add_argument("--metrics", type=Path, default=Path("reports/metrics.json"))
    ap.add_argument("--faces", type=Path, default=Path("reports/evaluate_faces.csv"))
    ap.add_argument("--model-comparison", type=Path, default=Path("reports/model_comparison.json"),
                    help="the model_comparison stage's report, copied into the metrics as model_comparison")
    args = ap.parse_args(argv)
    keep_freed_memory()
    params = read_params(args.params, "evaluate", "synth.face_model", "reconstruct.out")
    p = params["evaluate"]
    model = load_face_model(params["synth"]["face_model"])  # drew the synthetic faces
    sfm = load_face_model(p["sfm_model"])
    if sfm.n_verts != SFM_VERTS:
        raise SystemExit(f"evaluate.sfm_model: {p['sfm_model']} has {sfm.n_verts} vertices, not the SFM's "
                         f"{SFM_VERTS} that eos fits (the face_model_sfm stage writes it)")

    truth = pd.read_parquet(args.synth / "truth.parquet")
    recon, fitted_with = synthetic_reconstructions(args.synth / "reconstructions")
    scores = synthetic_scores(truth, recon, model.mean_shape, model.face_region, p["alignment"])
    if len(scores):
        fitter = EosFitter(p["sfm_dir"], sfm.landmarks, p["eos_iterations"], p["eos_lambda_identity"],
                           p["eos_lambda_expressions"])
        verts, lmk, seconds = run_eos(scores, truth, recon, fitter)
        scores = add_peer_scores(scores, truth, verts, lmk, seconds, model.face_region, p["alignment"])
        scores = add_surface_scores(scores, truth, recon, model, fitted_with, verts, sfm)
    metrics = synthetic_metrics(scores, truth["yaw_deg"].to_numpy(np.float64),
                                seconds_per_face(args.synth / "reconstructions" / "summary.json"))

    annotations = find_annotations(p["annotated_images"], p["annotations"])
    annotated = read_reconstructions(args.annotated)
    ann_decoder = FaceDecoder(load_face_model(json.loads((args.annotated / "summary.json").read_text())["face_model"]))
    ann_scores = annotated_scores(annotated, annotations, functools.partial(model_landmark_floor, ann_decoder))
    metrics.update(annotated_metrics(ann_scores))

    photos = read_reconstructions(params["reconstruct"]["out"], ["masked_psnr"])
    psnr = photos["masked_psnr"].to_numpy(np.float64) if len(photos) else np.zeros(0)
    metrics.update(masked_psnr=float(np.nanmean(psnr)) if len(psnr) else None, masked_psnr_count=int(len(psnr)))
    if args.model_comparison.exists():
        metrics["model_comparison"] = json.loads(args.model_comparison.read_text())
    else:
        print(f"model_comparison left out of the metrics: no {args.model_comparison} (dvc repro model_comparison)")

    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    faces = pd.concat([scores.drop(columns="recon_row").assign(set="synthetic"),
                       ann_scores.rename(columns={"image": "file"}).assign(set="annotated")], ignore_index=True)
    faces.to_csv(args.faces, index=False, float_format="%.5g")
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}))


if __name__ == "__main__":
    main()
