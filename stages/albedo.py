"""Stage `albedo`: give a face model without a colour model (the default SFM) a PCA albedo model fitted on the
training photos -> models/face_model_albedo.npz. A model that already has one (BFM) passes through unchanged."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.face_model import FaceDecoder, load_face_model, save_face_model
from pipeline.host_memory import keep_freed_memory
from pipeline.reconstruct.albedo import build_albedo_model, reflectance_samples
from pipeline.reconstruct.fit import FitSettings, fit_coefficients
from pipeline.reconstruct.outputs import faces_to_batch
from pipeline.shards import read_faces
from stages import read_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--face-model", default="models/face_model.npz")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--out", default="models/face_model_albedo.npz")
    ap.add_argument("--report", default="reports/albedo.json")
    args = ap.parse_args()
    keep_freed_memory()
    p = read_params(args.params, "albedo")["albedo"]
    torch.manual_seed(0)

    model = load_face_model(args.face_model)
    start = time.perf_counter()
    summary = {"source_k_alb": model.k_alb}
    if model.k_alb > 0:
        save_face_model(model, args.out)
        summary.update(faces=0, note="face model already has an albedo model: copied unchanged")
    else:
        faces = read_faces(sorted(Path(args.shards).glob("train-*.parquet")))
        if len(faces) == 0:
            raise SystemExit(f"no training faces in {args.shards}: the albedo model needs photos")
        decoder = FaceDecoder(model)
        # steps and lr from params, the loss and point weights the fit's defaults: an experiment on the reconstruct
        # params (dvc exp run -S reconstruct...) leaves this model, and the synthetic set drawn from it, as they are
        fit = FitSettings(landmark_steps=p["landmark_steps"], full_steps=p["full_steps"], lr=p["lr"])
        samples, weights = [], []
        for lo in tqdm(range(0, len(faces), p["batch_size"]), desc="albedo: fit + sample"):
            batch = faces_to_batch(faces.iloc[lo:lo + p["batch_size"]], torch.device("cpu"))
            coeffs = fit_coefficients(decoder, batch.photo, batch.face_mask, batch.lmk_px, fit,
                                      mesh_px=batch.mesh_px)
            reflectance, weight = reflectance_samples(decoder, coeffs, batch.photo, batch.face_mask)
            samples.append(reflectance.numpy())
            weights.append(weight.numpy())
        reflectance, weight = np.concatenate(samples), np.concatenate(weights)
        mean, basis = build_albedo_model(reflectance, weight, p["components"], p["prior_weight"])
        model = model.with_albedo(mean, basis, version=f"{model.version}+albedo{basis.shape[1]}")
        save_face_model(model, args.out)
        summary.update(faces=len(faces), k_alb=int(basis.shape[1]),
                       vertices_seen_fraction=float((weight.sum(0) > 0).mean()),
                       mean_albedo_rgb=[round(float(x), 4) for x in mean.mean(0)])
    summary["seconds"] = round(time.perf_counter() - start, 2)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
