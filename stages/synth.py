"""Stage `synth`: a synthetic benchmark with ground truth -> data/synth/images/*.png and data/synth/truth.parquet.

Random faces of the face model (params synth.face_model; one without a colour model gets painted brows, eyes
and lips) rendered over background patches of real photos
(synth.backgrounds: photos with detections/NAME.txt, whose 5 points keep the patch off the face). The images
are an ordinary photo folder: `reconstruct_synth` runs the full preprocessing + reconstruction on it. They live
in their own folder, outside data.images, so they never enter training.

truth.parquet, one row per image: file (image file name), the coefficient groups id/exp/alb/rot/sh/trans
(float32 lists; rot in radians, trans in world units of the 224 render), pitch_deg/yaw_deg/roll_deg,
canvas_rot_deg and canvas_scale (the similarity from the 224 render to the canvas, also as `transform`, 2x3
flattened), lmk_px (68*2, canvas px, 0-based), verts_model (V*3, mm, identity + expression before pose),
face_area_px, background (source photo name), canvas_px, face_model (model name).
"""
from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from pipeline.evaluate.synth import (SynthSettings, background_patch, painted_albedo, read_five_points,
                                     render_synthetic, sample_canvas_transform, sample_coefficients)
from pipeline.face_model import FaceDecoder, load_face_model
from pipeline.host_memory import keep_freed_memory
from stages import read_params

BATCH = 8  # faces rendered together: bounds memory, keeps the CPU renderer's batches efficient


def background_sources(folder: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """[(name, photo (H, W, 3) uint8 RGB, five points (5, 2) px)] for each photo in `folder` with a
    detections/NAME.txt."""
    sources = []
    for note in sorted((folder / "detections").glob("*.txt")):
        photos = [p for p in folder.glob(f"{note.stem}.*") if p.is_file()]
        bgr = cv2.imread(str(photos[0])) if photos else None
        if bgr is not None:
            sources.append((photos[0].name, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), read_five_points(note)))
    return sources


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.synth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, default=Path("data/synth"))
    args = ap.parse_args(argv)
    keep_freed_memory()
    p = read_params(args.params, "synth")["synth"]
    settings = SynthSettings(**p["sampling"])
    model = load_face_model(p["face_model"])
    if model.k_alb == 0:  # no colour model: give the uniform skin brows, eyes and lips (painted_albedo says why)
        model = model.with_albedo(painted_albedo(model), model.albedo_basis, model.version + "+painted-features")
    decoder = FaceDecoder(model)
    rng = np.random.default_rng(p["seed"])

    sources = background_sources(Path(p["backgrounds"]))
    if not sources:
        raise SystemExit(f"{p['backgrounds']}: no photos with detections/NAME.txt to cut backgrounds from")
    images_dir = args.out / "images"
    if images_dir.exists():
        shutil.rmtree(images_dir)  # a smaller count must not leave stale images behind
    images_dir.mkdir(parents=True)

    rows = []
    for lo in range(0, p["count"], BATCH):
        n = min(BATCH, p["count"] - lo)
        coeffs = np.stack([sample_coefficients(decoder.layout, settings, rng) for _ in range(n)])
        transforms = np.stack([sample_canvas_transform(settings, decoder.camera.size_px, rng) for _ in range(n)])
        picks = rng.integers(len(sources), size=n)
        backgrounds = np.stack([background_patch(sources[k][1], sources[k][2], settings.canvas_px, rng)
                                for k in picks])
        batch = render_synthetic(decoder, coeffs, backgrounds, transforms, settings.noise_std, rng)
        groups = decoder.layout.split(torch.from_numpy(coeffs))
        for i in range(n):
            name = f"synth_{lo + i:04d}.png"
            cv2.imwrite(str(images_dir / name), cv2.cvtColor(batch.images[i], cv2.COLOR_RGB2BGR))
            pitch, yaw, roll = np.degrees(groups.rot[i].numpy())
            row = {"file": name}
            row.update({g: getattr(groups, g)[i].numpy().copy() for g in groups._fields})
            row.update(pitch_deg=float(pitch), yaw_deg=float(yaw), roll_deg=float(roll),
                       canvas_rot_deg=float(math.degrees(math.atan2(transforms[i][1, 0], transforms[i][0, 0]))),
                       canvas_scale=float(np.hypot(transforms[i][0, 0], transforms[i][1, 0])),
                       transform=transforms[i].reshape(-1).astype(np.float32),
                       lmk_px=batch.lmk_px[i].reshape(-1), verts_model=batch.verts_model[i].reshape(-1),
                       face_area_px=float(batch.face_area_px[i]), background=sources[picks[i]][0],
                       canvas_px=settings.canvas_px, face_model=model.name)
            rows.append(row)
    pd.DataFrame(rows).to_parquet(args.out / "truth.parquet", index=False)
    yaws = np.array([r["yaw_deg"] for r in rows])
    print(f"{len(rows)} synthetic faces ({model.name}, |yaw| up to {np.abs(yaws).max():.0f} deg) -> {args.out}")


if __name__ == "__main__":
    main()
