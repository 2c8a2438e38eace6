"""Stage `model_comparison`: the same faces fitted with each face model -> reports/model_comparison.json.

Models (model_comparison.models: name -> .npz) are compared as converted, all with their uniform mean albedo
(neither gets the PCA colour model that the albedo stage learns from fits of one model), by the per-image fit of
the reconstruct stage (reconstruct.* settings, method fit, but model_comparison.full_steps full-loss steps):
- annotated: the annotated photos (evaluate.annotated_images / evaluate.annotations), preprocessed once and fitted
  with each model; landmark NME (all 68, inner 51) in the annotation's convention, and each model's landmark
  floor (benchmark.annotated_metrics, as the evaluate stage reports them).
- synthetic: one set of model_comparison.synthetic_faces faces drawn from EACH model (synth.sampling, with
  |yaw| up to model_comparison.yaw_max_deg), rendered over photo backgrounds, preprocessed once and fitted with
  every model. A model fitted to its own renders is favoured (the truth lies in its span, with its landmark
  convention); the cross-model cells are the fair ones. Landmark NME against the drawn landmarks, and the
  model-agnostic surface error (pipeline.evaluate.model_comparison) for every cell.
JSON: {"annotated": {model: metrics}, "synthetic": {"drawn_by_<a>": {"fitted_by_<b>": cell}}, "better_on_photos":
name, "seconds"}.
"""
from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.detect import CropSettings, LandmarkSettings, preprocess_photos
from pipeline.evaluate.annotations import find_annotations
from pipeline.evaluate.benchmark import annotated_metrics, annotated_scores, landmark_column, pick_faces, stack_column
from pipeline.evaluate.landmark_floor import model_landmark_floor
from pipeline.evaluate.model_comparison import set_summary, surface_errors
from pipeline.evaluate.synth import SynthSettings, background_sources, draw_faces, drawing_model
from pipeline.face_model import FaceDecoder, FaceModel, load_face_model
from pipeline.host_memory import keep_freed_memory
from pipeline.reconstruct.fit import FitSettings
from pipeline.reconstruct.stream import reconstruct_faces
from pipeline.segment import MaskSettings
from stages import read_params


def fit_table(model: FaceModel, faces: pd.DataFrame, fit: FitSettings, batch_size: int) -> pd.DataFrame:
    """The reconstruct stage's rows (method fit) of `faces` (preprocessed rows) with `model`."""
    rows = reconstruct_faces(FaceDecoder(model), faces, "fit", fit, batch_size=batch_size)
    return pd.DataFrame(rows)


def synthetic_cell(truth: pd.DataFrame, recon: pd.DataFrame, drawer: FaceModel, fitter: FaceModel) -> dict:
    """set_summary of the reconstructions `recon` of the faces in `truth` (draw_faces rows of `drawer`) by
    `fitter`; a face counts as found when a reconstruction overlaps it (benchmark.pick_faces)."""
    gt_lmk = stack_column(truth["lmk_px"], (68, 2))
    matches = pick_faces(recon, dict(zip(truth["file"], gt_lmk)), lambda source: Path(source).name)
    found = truth[[f in matches and matches[f].found for f in truth["file"]]]
    rows = recon.loc[[matches[f].row for f in found["file"]]]
    surface = surface_errors(stack_column(found["verts_model"], (drawer.n_verts, 3)), drawer.landmarks,
                             drawer.face_region, stack_column(rows["verts_model"], (fitter.n_verts, 3)),
                             fitter.triangles, fitter.landmarks)
    return set_summary(landmark_column(rows, "lmk_px"), stack_column(found["lmk_px"], (68, 2)), surface, len(truth))


def check_distinct(models: dict[str, FaceModel]) -> None:
    """Refuse two entries of model_comparison.models holding the same model (by FaceModel.name): pointing `sfm` at
    models/face_model.npz, which holds face_model.source's model, compared ICT with itself under `source: ict`."""
    by_name: dict[str, list[str]] = {}
    for key, model in models.items():
        by_name.setdefault(model.name, []).append(key)
    same = {name: keys for name, keys in by_name.items() if len(keys) > 1}
    if same:
        raise SystemExit("model_comparison.models: " + "; ".join(f"{', '.join(keys)} are all {name!r}"
                                                                  for name, keys in same.items())
                         + ": each entry must be a different model")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.model_comparison", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, default=Path("reports/model_comparison.json"))
    args = ap.parse_args(argv)
    keep_freed_memory()
    params = read_params(args.params, "model_comparison", "reconstruct", "crop", "landmarks", "masks", "workers",
                         "evaluate", "synth")
    p, r, e = params["model_comparison"], params["reconstruct"], params["evaluate"]
    fit = FitSettings.from_params({**r, "full_steps": p["full_steps"]})
    prep = dict(crop=CropSettings(**params["crop"]), landmarks=LandmarkSettings(**params["landmarks"]),
                masks=MaskSettings(**params["masks"]), workers=params["workers"])
    models = {name: load_face_model(path) for name, path in p["models"].items()}
    check_distinct(models)
    start = time.perf_counter()

    annotations = find_annotations(e["annotated_images"], e["annotations"])
    faces, _ = preprocess_photos(sorted(annotations), root=e["annotated_images"], **prep)
    annotated = {}
    for name, model in models.items():
        floor = functools.partial(model_landmark_floor, FaceDecoder(model))
        scores = annotated_scores(fit_table(model, faces, fit, r["batch_size"]), annotations, floor)
        annotated[name] = {**annotated_metrics(scores),
                           "per_image_nme_inner": dict(zip(scores["image"], scores["nme_inner"].round(5)))}
        print(f"annotated, {name}: {json.dumps(annotated[name])}")

    settings = SynthSettings(**{**params["synth"]["sampling"], "yaw_max_deg": p["yaw_max_deg"]})
    sources = background_sources(Path(params["synth"]["backgrounds"]))
    synthetic = {}
    with tempfile.TemporaryDirectory() as tmp:
        for drawer_name, drawer in models.items():
            folder = Path(tmp) / drawer_name
            folder.mkdir()
            painted = drawing_model(drawer)
            rows = []
            for file, image, row in draw_faces(FaceDecoder(painted), painted.name, settings, sources,
                                               p["synthetic_faces"], np.random.default_rng(p["seed"])):
                cv2.imwrite(str(folder / file), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
                rows.append(row)
            truth = pd.DataFrame(rows)
            faces, _ = preprocess_photos(sorted(folder.glob("*.png")), root=folder, **prep)
            cells = {}
            for fitter_name, fitter in models.items():
                cells[f"fitted_by_{fitter_name}"] = synthetic_cell(truth, fit_table(fitter, faces, fit,
                                                                                    r["batch_size"]), drawer, fitter)
                print(f"synthetic drawn by {drawer_name}, fitted by {fitter_name}: "
                      f"{json.dumps(cells[f'fitted_by_{fitter_name}'])}")
            synthetic[f"drawn_by_{drawer_name}"] = cells

    scored = {n: m["landmark_nme_inner"] for n, m in annotated.items() if m["landmark_nme_inner"] is not None}
    report = {"annotated": annotated, "synthetic": synthetic,
              "better_on_photos": min(scored, key=scored.get) if scored else None,
              "models": {n: {"name": m.name, "version": m.version, "vertices": m.n_verts} for n, m in models.items()},
              "seconds": round(time.perf_counter() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"better_on_photos": report["better_on_photos"], "seconds": report["seconds"]}))


if __name__ == "__main__":
    main()
