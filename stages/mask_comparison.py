"""Stage `mask_comparison`: the face-mask methods (masks.method mesh, skin; and mesh gated by skin colour at
mask_comparison.skin_gate) measured in one bounded run -> reports/mask_comparison.json.

1. Synthetic faces (mask_comparison.synth_faces of data/synth, evenly spaced through truth.parquet): preprocessed
   as `reconstruct_synth` does (params crop, landmarks), each method's mask made on the same crops; IoU (masks
   at half weight) with the true region rendered from the truth (pipeline.evaluate.synth.true_region_weights:
   `skin`, the model's face_region; `surface`, the whole visible face; both without the eye and inner-mouth
   vertices), then the fit (params reconstruct, method fit) with each method's masks and its vertex error
   (evaluate.alignment, the face region), as the evaluate stage scores it. true_region_mesh_faces: the IoUs
   over the faces whose mesh was usable only (the others fell back to the skin model under method mesh).
2. The annotated photos (evaluate.annotated_images, evaluate.annotations): preprocessed the same way, fitted
   with each method's masks and scored as the evaluate stage scores them (landmark_nme, landmark_nme_inner): the
   real photos, where hair, hands and shadows lie inside the face region, decide as much as the renders.
3. The sample photos' faces (data/interim crops and landmarks, from data.images): IoU between the mesh and the
   skin masks, where no truth exists; faces that fell back from the mesh.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.detect import CROP_SIZE_PX, CropSettings, LandmarkSettings, preprocess_photos
from pipeline.evaluate.annotations import find_annotations
from pipeline.evaluate.mask_comparison import (HALF_WEIGHT, faces_masks, fit_annotated_nmes, fit_vertex_errors, iou,
                                               mask_variants, summary, true_regions)
from pipeline.face_model import FaceDecoder, load_face_model
from pipeline.host_memory import keep_freed_memory
from pipeline.reconstruct.fit import FitSettings
from pipeline.segment import MaskSettings
from pipeline.shards.tables import iter_rows, join_in_order
from stages import build_settings, read_params

SECTIONS = ("mask_comparison", "masks", "crop", "landmarks", "workers", "reconstruct", "synth.face_model",
            "evaluate.alignment", "evaluate.annotated_images", "evaluate.annotations")
CROPS = Path("data/interim/crops.parquet")
LANDMARKS = Path("data/interim/landmarks.parquet")
FIT_METHODS = ("mesh", "skin")  # fitted with; mesh_gated is scored by IoU only (it would double the run)


def pick_faces(truth: pd.DataFrame, count: int) -> pd.DataFrame:
    """`count` rows of truth spread evenly through it (all when count >= its length)."""
    if count >= len(truth):
        return truth.reset_index(drop=True)
    return truth.iloc[np.unique(np.linspace(0, len(truth) - 1, count).round().astype(int))].reset_index(drop=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.mask_comparison", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--synth", type=Path, default=Path("data/synth"))
    ap.add_argument("--out", type=Path, default=Path("reports/mask_comparison.json"))
    args = ap.parse_args(argv)
    keep_freed_memory()
    params = read_params(args.params, *SECTIONS)
    masks = build_settings(MaskSettings, {**params["masks"], "method": "mesh", "bisenet_weights": ""}, "masks")
    crop = build_settings(CropSettings, params["crop"], "crop")
    landmarks = build_settings(LandmarkSettings, params["landmarks"], "landmarks")
    p = params["reconstruct"]
    try:
        fit = FitSettings.from_params(p)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"reconstruct: bad parameters: {error}") from None
    variants = mask_variants(masks, params["mask_comparison"]["skin_gate"])
    start = time.perf_counter()
    seconds = {}

    truth = pick_faces(pd.read_parquet(args.synth / "truth.parquet"), params["mask_comparison"]["synth_faces"])
    faces, _ = preprocess_photos([args.synth / "images" / f for f in truth["file"]], crop, landmarks,
                                 variants["skin"], params["workers"], root=args.synth / "images")
    faces = faces.drop_duplicates("source").reset_index(drop=True)  # one face per synthetic image: the largest
    by_file = truth.set_index("file")
    seconds["preprocess"] = time.perf_counter() - start

    truth_model = load_face_model(params["synth"]["face_model"])
    t = time.perf_counter()
    face_truth = by_file.loc[[Path(s).name for s in faces["source"]]].reset_index()
    regions = true_regions(truth_model, FaceDecoder(truth_model), face_truth, faces, CROP_SIZE_PX)
    made = {name: faces_masks(faces, settings) for name, settings in variants.items()}
    seconds["masks_and_truth"] = time.perf_counter() - t

    synthetic = {"faces": int(len(truth)), "detected": int(len(faces)), "true_region": {}}
    for kind, region in regions.items():
        synthetic["true_region"][kind] = {name: summary(iou(weights >= HALF_WEIGHT, region))
                                          for name, (weights, _, _) in made.items()}
    meshed = np.array([m == "mesh" for m in made["mesh"][1]], bool)  # faces whose mesh was usable
    synthetic["mesh_fallbacks"] = int((~meshed).sum())
    synthetic["true_region_mesh_faces"] = {
        kind: {name: summary(iou(weights[meshed] >= HALF_WEIGHT, region[meshed]))
               for name, (weights, _, _) in made.items()} for kind, region in regions.items()}

    t = time.perf_counter()
    decoder = FaceDecoder(load_face_model(p["face_model"]))
    errors = {}
    for name in FIT_METHODS:
        scores = fit_vertex_errors(truth_model, decoder, faces, made[name][0], truth, fit,
                                   p["batch_size"], params["evaluate"]["alignment"])
        errors[name] = {"faces": int(len(scores)), "vertex_error_mm": summary(scores["err_mm"]),
                        "meanface_error_mm": float(scores["err_meanface_mm"].mean()) if len(scores) else None}
    synthetic["fit"] = errors
    seconds["fits"] = time.perf_counter() - t

    t = time.perf_counter()
    e = params["evaluate"]
    annotations = find_annotations(e["annotated_images"], e["annotations"])
    annotated_faces, _ = preprocess_photos(sorted(annotations), crop, landmarks, variants["skin"], params["workers"])
    annotated = {"images": len(annotations), "faces": int(len(annotated_faces)),
                 "fit": {name: fit_annotated_nmes(decoder, annotated_faces,
                                                  faces_masks(annotated_faces, variants[name])[0], annotations,
                                                  fit, p["batch_size"]) for name in FIT_METHODS}}
    seconds["annotated"] = time.perf_counter() - t

    t = time.perf_counter()
    photos = pd.DataFrame(join_in_order(iter_rows(CROPS, columns=["id", "source", "crop", "mesh", "mesh_score"]),
                                        iter_rows(LANDMARKS, columns=["id", "landmarks"])))
    mesh, _, fallbacks = faces_masks(photos, variants["mesh"])
    skin, _, _ = faces_masks(photos, variants["skin"])
    photo_iou = iou(mesh >= HALF_WEIGHT, skin >= HALF_WEIGHT)
    sample = {"faces": int(len(photos)), "mesh_fallbacks": int(sum(f is not None for f in fallbacks)),
              "iou_mesh_vs_skin": summary(photo_iou),
              "per_face": dict(zip(photos["id"], np.round(photo_iou, 4).tolist()))}
    seconds["sample_photos"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start

    report = {"synthetic": synthetic, "annotated": annotated, "sample_photos": sample,
              "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "settings": {"skin_gate": masks.skin_gate, "skin_gate_gated": variants["mesh_gated"].skin_gate,
                           "feather_px": masks.feather_px,
                           "min_mesh_score": masks.min_mesh_score, "binarised_at": HALF_WEIGHT}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "sample_photos"}, indent=1))


if __name__ == "__main__":
    main()
