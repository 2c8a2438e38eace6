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
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.evaluate.synth import SynthSettings, background_sources, draw_faces, drawing_model
from pipeline.face_model import FaceDecoder, load_face_model
from pipeline.host_memory import keep_freed_memory
from stages import read_params


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.synth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, default=Path("data/synth"))
    args = ap.parse_args(argv)
    keep_freed_memory()
    p = read_params(args.params, "synth")["synth"]
    settings = SynthSettings(**p["sampling"])
    model = drawing_model(load_face_model(p["face_model"]))
    rng = np.random.default_rng(p["seed"])

    sources = background_sources(Path(p["backgrounds"]))
    if not sources:
        raise SystemExit(f"{p['backgrounds']}: no photos with detections/NAME.txt to cut backgrounds from")
    images_dir = args.out / "images"
    if images_dir.exists():
        shutil.rmtree(images_dir)  # a smaller count must not leave stale images behind
    images_dir.mkdir(parents=True)
    rows = []
    for name, image, row in draw_faces(FaceDecoder(model), model.name, settings, sources, p["count"], rng):
        cv2.imwrite(str(images_dir / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        rows.append(row)
    pd.DataFrame(rows).to_parquet(args.out / "truth.parquet", index=False)
    yaws = np.array([r["yaw_deg"] for r in rows])
    print(f"{len(rows)} synthetic faces ({model.name}, |yaw| up to {np.abs(yaws).max():.0f} deg) -> {args.out}")


if __name__ == "__main__":
    main()
