"""How close the reconstruct stage's fit can come to the annotated photos' ground truth when its 68-point input is
the ground truth itself: the part of the landmark error that no better landmark detector could remove.

Each annotated photo is preprocessed as the pipeline does (params.yaml crop, landmarks, masks). The annotated
face (the one overlapping its ground-truth box most, as the evaluate stage matches) is then fitted three ways,
with the reconstruct stage's settings (params.yaml reconstruct, method fit):
- from its detected points (what the pipeline outputs);
- from the ground truth in their place (crop px; crop, mask and face mesh as detected): the full fit, and its
  landmark stage alone;
- the face model's reach: its landmarks fitted to the ground truth alone, no prior (the evaluate stage's
  landmark_nme_model_floor);
- the fit from the detected input with its prior and image terms off (TRACKING_*: 400 full steps of plain
  least squares on the inner points, 16x the landmark weight): about the closest a fit that follows the input
  can come to it.
Prints the inner-51-point NME (% of sqrt(w h) of the ground-truth box) per photo and the means, beside the
detected input's own. If the fit from the truth is above the best input's NME, following any input more
closely cannot bring the fit below that input: its prior and photometric term hold it off the points. If the
input-tracking fit is at or above the input's own NME, dropping the prior and the photometric term cannot
either: a fit that follows the input inherits its error and keeps the part of it the model can express.
A second table gives each column's eye opening and width beside the ground truth's, where the prior costs most.

Usage (repo root, after `dvc repro face_model albedo`; PYTHONPATH=. so that this tree's pipeline is imported):
    PYTHONPATH=. python scripts/fit_from_truth.py [--params params.yaml] [--face-model models/face_model_ict.npz]
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.detect import CropSettings, LandmarkSettings, preprocess_photos
from pipeline.detect.alignment import transform_points
from pipeline.evaluate.annotations import find_annotations
from pipeline.evaluate.benchmark import landmark_column, our_landmarks, pick_faces, stack_column
from pipeline.evaluate.landmark_floor import model_landmark_floor
from pipeline.evaluate.metrics import INNER_POINTS, landmark_nme
from pipeline.face_model import FaceDecoder, load_face_model
from pipeline.reconstruct.fit import FitSettings
from pipeline.reconstruct.stream import reconstruct_faces
from pipeline.segment import MaskSettings
from stages import build_settings, read_params


# The input-tracking fit: 16x the stage's landmark weight and twice its full steps. Measured on the SFM: 200
# robust steps at that weight (prior 1e-6) gave 2.14 %, 400 plain least-squares steps 2.12 %: converged.
TRACKING_STEPS = 400
TRACKING_LANDMARK_GAIN = 16.0


def inner_nme(pred_px: np.ndarray, gt_px: np.ndarray) -> np.ndarray:
    """(N,) inner-51 NME in % of (N, 68, 2) photo-px predictions against the ground truth."""
    return 100 * landmark_nme(pred_px, gt_px, INNER_POINTS)


def eye_shape(lmk_px: np.ndarray, gt_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) eye opening and (N,) eye width, both eyes' mean, in % of sqrt(w h) of the ground-truth box, of (N, 68, 2)
    photo-px landmarks: the distance between the mean of the upper lid points (iBUG 37-38, 43-44) and of the lower
    (40-41, 46-47), and between the corners (36-39, 42-45)."""
    box = np.sqrt(np.prod(gt_px.max(1) - gt_px.min(1), axis=1))
    opening = [np.linalg.norm(lmk_px[:, up].mean(1) - lmk_px[:, lo].mean(1), axis=1)
               for up, lo in (([37, 38], [40, 41]), ([43, 44], [46, 47]))]
    width = [np.linalg.norm(lmk_px[:, b] - lmk_px[:, a], axis=1) for a, b in ((36, 39), (42, 45))]
    return 100 * np.mean(opening, axis=0) / box, 100 * np.mean(width, axis=0) / box


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--face-model", type=Path, default=None,
                    help="face model .npz to fit (default: params reconstruct.face_model), "
                         "e.g. models/face_model_ict.npz")
    args = ap.parse_args(argv)
    params = read_params(args.params, "crop", "landmarks", "masks", "workers", "reconstruct", "evaluate")
    e, p = params["evaluate"], params["reconstruct"]
    notes = {str(path.resolve()): a for path, a in find_annotations(e["annotated_images"], e["annotations"]).items()}
    settings = (build_settings(CropSettings, params["crop"], "crop"),
                build_settings(LandmarkSettings, params["landmarks"], "landmarks"),
                build_settings(MaskSettings, params["masks"], "masks"))
    faces, _ = preprocess_photos([Path(k) for k in sorted(notes)], *settings, params["workers"])
    faces = faces.reset_index(drop=True)  # labels = positions, as in the reconstruction rows
    decoder = FaceDecoder(load_face_model(args.face_model or p["face_model"]))
    fit = FitSettings.from_params(p)

    def fitted(rows_in: pd.DataFrame, settings: FitSettings) -> pd.DataFrame:
        return pd.DataFrame(reconstruct_faces(decoder, rows_in, "fit", settings, batch_size=p["batch_size"]))

    detected = fitted(faces, fit)  # rows in the order of faces
    matches = pick_faces(detected, {k: a.lmk_px for k, a in notes.items()}, lambda source: str(Path(source).resolve()))
    keys = sorted(k for k in matches if matches[k].found)
    if not keys:
        raise SystemExit("no annotated face was found")
    index = [matches[k].row for k in keys]
    gt = np.stack([notes[k].lmk_px for k in keys])
    formats = [notes[k].format for k in keys]
    transform = stack_column(faces.loc[index, "transform"], (2, 3))
    truth_input = faces.loc[index].copy()
    truth_input["landmarks"] = [transform_points(g, t).astype(np.float32).reshape(-1) for g, t in zip(gt, transform)]

    columns = {
        "detected input (landmarks.source)": landmark_column(detected.loc[index], "input_lmk_px"),
        "fit from the input": our_landmarks(detected.loc[index], formats),
        "fit from the truth": our_landmarks(fitted(truth_input, fit), formats),
        "landmark stage from the truth": our_landmarks(fitted(truth_input, replace(fit, full_steps=0)), formats),
        "model reach (no prior)": model_landmark_floor(decoder, gt, transform),
    }
    tracking = replace(fit, full_steps=TRACKING_STEPS, landmark_stage_coefficient=0.0, jaw_weight=0.0,
                       weights=replace(fit.weights, photometric=0.0, identity=0.0, coefficient=0.0,
                                       landmark_delta_px=0.0, landmark=TRACKING_LANDMARK_GAIN * fit.weights.landmark))
    columns["input tracked (no prior)"] = our_landmarks(fitted(faces, tracking).loc[index], formats)
    names = [Path(k).name for k in keys]
    table = pd.DataFrame({name: inner_nme(pred, gt) for name, pred in columns.items()}, index=names)
    table.loc["mean"] = table.mean()
    print("inner-51 landmark NME, % (annotated photos)")
    print(table.round(2).to_string())
    eyes = pd.DataFrame({(name, part): value for name, pred in {"ground truth": gt, **columns}.items()
                         for part, value in zip(("opening", "width"), eye_shape(pred, gt))}, index=names).T
    print("\neye opening and width, % of the ground-truth box (both eyes' mean)")
    print(eyes.round(1).to_string())


if __name__ == "__main__":
    main()
