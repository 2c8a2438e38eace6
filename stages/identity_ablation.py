"""Stage `identity_ablation`: the fit with and without the identity term (dlib's ResNet), in one run.

    python -m stages.identity_ablation [--synth-faces 12] [--full-steps 60] [--train-epochs 34]

Preprocesses (as reconstruct does) the annotated photos (evaluate.annotated_images, ground truth
evaluate.annotations) and the first --synth-faces images of data/synth, then fits them all twice with the
`reconstruct` settings: loss_weights.identity 0 and --identity (default 0.2, the paper's) with identity_net
dlib, both with --full-steps full steps (fewer than reconstruct.full_steps keeps the stage within minutes on
a 2-core CPU: the recogniser costs several plain fit steps per step). Scores each run as `evaluate` does
(synthetic vertex error and landmark NME against data/synth/truth.parquet, landmark NME on the annotated
photos) and times the full stage's step with the term on and off on the same faces
(step_seconds_ratio = on / off). Training too: R-Net trained twice with the `train` settings but --train-epochs
epochs (34: ~100 steps on the sample shards; the train stage's 300 would cost several times that with the term),
train.loss.identity 0 and --identity, from the same seed, each network then reconstructing the same faces
(method network) and scored the same way, beside its validation landmark error. Writes
reports/identity_ablation.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from pipeline.detect import CropSettings, LandmarkSettings, preprocess_photos
from pipeline.evaluate.annotations import find_annotations
from pipeline.evaluate.benchmark import annotated_metrics, annotated_scores, synthetic_metrics, synthetic_scores
from pipeline.face_model import CoeffLayout, FaceDecoder, FaceModel, load_face_model
from pipeline.host_memory import keep_freed_memory
from pipeline.reconstruct.fit import FitSettings, fit_coefficients
from pipeline.reconstruct.outputs import faces_to_batch
from pipeline.reconstruct.stream import reconstruct_faces
from pipeline.nets import build_rnet
from pipeline.segment import MaskSettings
from pipeline.shards import ShardDataset
from pipeline.train import TrainPaths, init_distributed, load_rnet, train
from stages import build_settings, read_params
from stages.train import train_config

TIMED_STEPS = 5  # full steps timed per setting for the step cost


def fit_and_score(model: FaceModel, decoder: FaceDecoder, faces: pd.DataFrame, fit: FitSettings, batch_size: int,
                  truth: pd.DataFrame, annotations: dict, alignment: str, network=None) -> dict:
    """Fit every face with `fit` (or, given `network`, predict it: method network), then the evaluate stage's
    synthetic and annotated metrics of the result."""
    start = time.perf_counter()
    rows = reconstruct_faces(decoder, faces, "fit" if network is None else "network", fit, network,
                             batch_size=batch_size)
    seconds = time.perf_counter() - start
    recon = pd.DataFrame(rows)
    synth = synthetic_scores(truth, recon, model.mean_shape, model.face_region, alignment)
    metrics = synthetic_metrics(synth, truth["yaw_deg"].to_numpy(), seconds / max(len(faces), 1))
    metrics.update(annotated_metrics(annotated_scores(recon, annotations)))
    keep = ("synthetic_faces", "synthetic_faces_missed", "synthetic_vertex_error_mm",
            "synthetic_vertex_error_median_mm", "synthetic_landmark_nme", "landmark_nme", "landmark_nme_inner",
            "landmark_nme_count", "fit_seconds_per_face")
    return {k: metrics[k] for k in keep} | {"fit_seconds": round(seconds, 2)}


def train_network(cfg, model: FaceModel, shards: Path) -> tuple[torch.nn.Module, dict]:
    """R-Net trained with `cfg` on shards/train-*.parquet (validated on val-*), in a temporary folder:
    (the network in eval mode, the run's metrics: val_landmark_px, train_seconds, ...)."""
    train_set = ShardDataset(sorted(shards.glob("train-*.parquet")))
    val_paths = sorted(shards.glob("val-*.parquet"))
    with tempfile.TemporaryDirectory() as tmp:
        paths = TrainPaths(*(Path(tmp) / name for name in ("rnet.pt", "rnet_last.pt", "face_model.npz", "grid.png")))
        net = build_rnet(cfg.arch, CoeffLayout.of(model).size, cfg.init_weights or None)
        result = train(cfg, net, model, train_set, ShardDataset(val_paths) if val_paths else [], paths,
                       init_distributed("cpu"), resume=False)
        return load_rnet(paths.rnet), result.metrics


def step_seconds(decoder: FaceDecoder, faces: pd.DataFrame, fit: FitSettings) -> float:
    """Seconds per full-stage fit step on `faces` (one batch), the landmark stage skipped."""
    batch = faces_to_batch(faces, decoder.triangles.device)
    timed = replace(fit, landmark_steps=0, full_steps=TIMED_STEPS)
    fit.identity_features(batch.photo.device)  # loading the recogniser is not a step
    start = time.perf_counter()
    fit_coefficients(decoder, batch.photo, batch.face_mask, batch.lmk_px, timed, mesh_px=batch.mesh_px)
    return (time.perf_counter() - start) / TIMED_STEPS


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.identity_ablation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--synth", type=Path, default=Path("data/synth"), help="images/ and truth.parquet")
    ap.add_argument("--synth-faces", type=int, default=12, help="synthetic images fitted (the first, by name)")
    ap.add_argument("--full-steps", type=int, default=60, help="full fit steps of both runs")
    ap.add_argument("--identity", type=float, default=0.2, help="loss_weights.identity of the run with the term")
    ap.add_argument("--train-epochs", type=int, default=34, help="epochs of each training run (0: no training)")
    ap.add_argument("--out", type=Path, default=Path("reports/identity_ablation.json"))
    args = ap.parse_args(argv)
    if args.synth_faces < 0 or args.full_steps < 1 or not args.identity > 0 or args.train_epochs < 0:
        raise SystemExit("--synth-faces must be >= 0, --full-steps >= 1, --identity > 0 and --train-epochs >= 0")
    keep_freed_memory()
    params = read_params(args.params, "reconstruct", "crop", "landmarks", "masks", "workers", "evaluate", "train")
    p, e = params["reconstruct"], params["evaluate"]
    try:
        base = replace(FitSettings.from_params(p), full_steps=args.full_steps)
        off = replace(base, weights=replace(base.weights, identity=0.0), identity_net="none", identity_weights="")
        on = replace(base, weights=replace(base.weights, identity=args.identity), identity_net="dlib",
                     identity_weights=p["identity_weights"] if p["identity_net"] == "dlib" else "")
        t = params["train"]
        train_base = train_config(t)
        # epochs >= 1 keeps the config valid when --train-epochs 0 skips training
        train_off = replace(train_base, epochs=max(args.train_epochs, 1), loss=replace(train_base.loss, identity=0.0),
                            identity_net="none", identity_weights="")
        train_on = replace(train_off, loss=replace(train_off.loss, identity=args.identity), identity_net="dlib",
                           identity_weights=t["identity_weights"] if t["identity_net"] == "dlib" else "")
    except (TypeError, ValueError) as error:
        raise SystemExit(f"reconstruct / train: bad parameters: {error}") from None
    settings = (build_settings(CropSettings, params["crop"], "crop"),
                build_settings(LandmarkSettings, params["landmarks"], "landmarks"),
                build_settings(MaskSettings, params["masks"], "masks"))
    truth = pd.read_parquet(args.synth / "truth.parquet").sort_values("file").iloc[:args.synth_faces]
    annotations = find_annotations(e["annotated_images"], e["annotations"])

    start = time.perf_counter()
    synth_faces, _ = preprocess_photos([args.synth / "images" / f for f in truth["file"]], *settings,
                                       params["workers"])
    annotated_faces, _ = preprocess_photos(sorted(annotations), *settings, params["workers"])
    faces = pd.concat([synth_faces, annotated_faces], ignore_index=True)
    preprocess_s = time.perf_counter() - start
    model = load_face_model(p["face_model"])
    decoder = FaceDecoder(model)
    torch.manual_seed(0)
    report = {"faces": len(faces), "synth_images": len(truth), "annotated_images": len(annotations),
              "full_steps": args.full_steps, "landmark_steps": base.landmark_steps, "identity_weight": args.identity,
              "preprocess_seconds": round(preprocess_s, 2)}
    for name, fit in (("identity_off", off), ("identity_on", on)):
        report[name] = fit_and_score(model, decoder, faces, fit, p["batch_size"], truth, annotations, e["alignment"])
        print(name, json.dumps(report[name]))
    if args.train_epochs:
        train_model = load_face_model(params["train"]["face_model"])
        train_decoder = FaceDecoder(train_model)
        for name, cfg in (("train_identity_off", train_off), ("train_identity_on", train_on)):
            net, run = train_network(cfg, train_model, Path(params["train"]["shards"]))
            report[name] = fit_and_score(train_model, train_decoder, faces, base, p["batch_size"], truth, annotations,
                                         e["alignment"], network=net)
            report[name] |= {k: run[k] for k in ("steps", "val_landmark_px_start", "val_landmark_px", "train_seconds")}
            print(name, json.dumps(report[name]))
    timed = faces.iloc[:p["batch_size"]]
    report["step_seconds_off"] = step_seconds(decoder, timed, off)
    report["step_seconds_on"] = step_seconds(decoder, timed, on)
    report["step_seconds_ratio"] = report["step_seconds_on"] / report["step_seconds_off"]
    report["seconds"] = round(time.perf_counter() - start, 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, dict)}))


if __name__ == "__main__":
    main()
