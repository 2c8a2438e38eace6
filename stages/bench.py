"""Stage `bench`: throughput of every hot path beside its peer or bound, measured in one run on this machine
-> reports/bench.json. Ratios compare numbers taken in the same run; absolute numbers depend on the machine.

    renderer        render_sfm_img_s, render_bfm_size_img_s vs deodr_sfm_img_s (render_vs_deodr)
    preprocessing   preprocess_img_s vs landmark_bound_img_s (preprocess_vs_landmark_bound)
    reconstruction  reconstruct_network_img_s vs rnet_forward_bound_img_s, fit_s_per_image
    training        train_img_s, train_loader_img_s_workers_0 / _2 (the epoch loader alone)
    scale           per N of bench.scale_faces: scale_peak_rss_mb, scale_img_s, scale_dataset_img_s (a fresh
                    process each); scale_rss_growth and scale_img_s_ratio (largest N vs smallest)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

from pipeline.bench.preprocess import landmark_bound_img_s, preprocess_img_s
from pipeline.bench.reconstruct import reconstruct_throughput
from pipeline.bench.render import (deodr_throughput, render_throughput, sfm_mean_face_scene,
                                   synthetic_bfm_size_mesh)
from pipeline.bench.scale import loader_img_s, replicate_shards, scale_run
from pipeline.bench.train import train_images_per_second
from pipeline.detect import CropSettings, LandmarkSettings, list_photos
from pipeline.face_model import FaceDecoder, load_face_model
from pipeline.host_memory import keep_freed_memory
from pipeline.nets import build_rnet
from pipeline.reconstruct.fit import FitSettings
from pipeline.segment import MaskSettings
from pipeline.shards import ShardDataset, read_faces
from stages.train import train_config
from stages import read_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="reports/bench.json")
    args = ap.parse_args()
    keep_freed_memory()
    params = read_params(args.params, "bench", "data", "face_model", "crop", "landmarks", "masks",
                         "workers", "reconstruct", "train", "pack")
    b = params["bench"]
    size, batch, repeats = b["size_px"], b["batch"], b["repeats"]
    torch.manual_seed(0)
    out: dict = {"device": "cuda" if torch.cuda.is_available() else "cpu", "cpu_count": os.cpu_count(),
                 "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                 "size_px": size, "batch": batch, "reconstruct_batches": b["reconstruct_batches"]}
    device = torch.device(out["device"])

    sfm = sfm_mean_face_scene(Path(params["face_model"]["sfm_dir"]) / "sfm_shape_3448.bin", device).repeat(batch)
    bfm = synthetic_bfm_size_mesh(device).repeat(batch)
    out["render_sfm_img_s"] = render_throughput(*sfm, size, size, repeats)
    out["render_bfm_size_img_s"] = render_throughput(*bfm, size, size, repeats)
    out["deodr_sfm_img_s"] = deodr_throughput(*sfm, size, size, repeats)
    out["render_vs_deodr"] = out["render_sfm_img_s"] / out["deodr_sfm_img_s"]

    images = Path(params["data"]["images"])
    photos = list_photos(images)
    crop, landmarks = CropSettings(**params["crop"]), LandmarkSettings(**params["landmarks"])
    out["landmark_bound_img_s"] = landmark_bound_img_s(photos, crop, landmarks, params["workers"])
    out["preprocess_img_s"] = preprocess_img_s(photos, images, crop, landmarks, MaskSettings(**params["masks"]),
                                               params["workers"])
    out["preprocess_vs_landmark_bound"] = out["preprocess_img_s"] / out["landmark_bound_img_s"]

    r = params["reconstruct"]
    face_model = load_face_model(r["face_model"])
    decoder = FaceDecoder(face_model).to(device)
    faces = read_faces(sorted(Path(r["shards"]).glob("*.parquet")))
    n_faces = batch * b["reconstruct_batches"]
    faces = faces.iloc[[i % len(faces) for i in range(n_faces)]].reset_index(drop=True)
    cfg = train_config(params["train"])
    network = build_rnet(cfg.arch, decoder.layout.size, None).to(device).eval()
    fit = FitSettings.from_params(r)
    out.update(reconstruct_throughput(decoder, network, faces, batch, fit, repeats))
    out["reconstruct_vs_rnet_bound"] = out["reconstruct_network_img_s"] / out["rnet_forward_bound_img_s"]

    train_faces = ShardDataset(sorted(Path(params["train"]["shards"]).glob("train-*.parquet")))
    out["train_img_s"] = train_images_per_second(cfg, load_face_model(params["train"]["face_model"]), train_faces,
                                                  device)

    sources = sorted(Path(r["shards"]).glob("*.parquet"))
    row_group_rows = params["pack"]["row_group_rows"]
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:  # the largest collection, shuffled epochs
        shards = replicate_shards(sources, max(b["scale_faces"]), Path(tmp), b["scale_shard_rows"], row_group_rows)
        for workers in (0, 2):
            out[f"train_loader_img_s_workers_{workers}"] = loader_img_s(shards, cfg.batch_size, workers,
                                                                        b["loader_batches"])
    checkpoint = Path(r["checkpoint"])
    out.update(scale_run(sources, b["scale_faces"], Path(r["face_model"]), checkpoint, cfg.arch, batch,
                         b["scale_shard_rows"], row_group_rows))

    out = {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
