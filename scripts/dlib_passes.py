"""How much averaging dlib's shape-predictor passes (landmarks.dlib_box_scales, landmarks.dlib_mirror) moves its
68 points towards the truth, on the annotated photos and the synthetic renders.

Each photo goes through the crop stage's code (params.yaml crop); on each crop, dlib's predictor runs from the seed
box the landmarks stage uses (dlib_box_crop), one pass against the passes of each variant below. The annotated face
is the one whose points overlap its ground-truth box most, as the evaluate stage matches; a render's truth is
data/synth/truth.parquet's lmk_px. Prints the inner-51-point NME (% of sqrt(w h) of the ground-truth box) per
annotated photo and each set's mean.

Usage (repo root, after `dvc repro synth`; PYTHONPATH=. so that this tree's pipeline is imported):
    PYTHONPATH=. python scripts/dlib_passes.py [--params params.yaml]
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.detect import CropSettings, invert_transform, transform_points
from pipeline.detect.crop import crop_task
from pipeline.detect.dlib_faces import fit_landmarks
from pipeline.detect.landmarks import dlib_box_crop
from pipeline.evaluate.annotations import find_annotations
from pipeline.evaluate.benchmark import box_iou, landmark_boxes
from pipeline.evaluate.metrics import INNER_POINTS, landmark_nme
from pipeline.shards.image_bytes import decode_rgb
from pipeline.shards.parallel import map_parallel
from stages import build_settings, read_params

SYNTH = Path("data/synth")  # the synth stage's output
VARIANTS = {  # name: (box_scales, mirror)
    "1 pass": ((1.0,), False),
    "mirrored": ((1.0,), True),
    "3 scales": ((0.95, 1.0, 1.05), False),
    "3 scales, mirrored": ((0.95, 1.0, 1.05), True),
    "5 scales, mirrored": ((0.9, 0.95, 1.0, 1.05, 1.1), True),
}


def photo_nmes(path: Path, truth_px: np.ndarray, settings: CropSettings) -> dict[str, float]:
    """{variant: inner NME in %} of the face of one photo whose single-pass points overlap truth_px (68, 2) photo px
    most; {} if the photo has no face."""
    best, best_iou = None, 0.0
    for row in crop_task(path, settings, path.parent)[0]:
        crop = decode_rgb(row["crop"])
        seed = dlib_box_crop(row, crop)
        to_photo = invert_transform(np.reshape(row["transform"], (2, 3)))
        points = transform_points(fit_landmarks(crop, seed), to_photo)
        iou = float(box_iou(landmark_boxes(points[None]), landmark_boxes(truth_px[None])[0])[0])
        if iou > best_iou:
            best, best_iou = (crop, seed, to_photo), iou
    if best is None:
        return {}
    crop, seed, to_photo = best
    found = {name: transform_points(fit_landmarks(crop, seed, scales, mirror), to_photo)
             for name, (scales, mirror) in VARIANTS.items()}
    return {name: 100 * float(landmark_nme(p[None], truth_px[None], INNER_POINTS)[0]) for name, p in found.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    params = read_params(args.params, "crop", "workers", "evaluate")
    crop = build_settings(CropSettings, params["crop"], "crop")
    e = params["evaluate"]
    photos = {path: a.lmk_px for path, a in find_annotations(e["annotated_images"], e["annotations"]).items()}
    truth = pd.read_parquet(SYNTH / "truth.parquet")
    renders = {SYNTH / "images" / f: np.reshape(lmk, (68, 2)) for f, lmk in zip(truth["file"], truth["lmk_px"])}
    for name, items in (("annotated photos", photos), ("synthetic renders", renders)):
        paths = sorted(items)
        task = functools.partial(_photo_task, settings=crop)
        scores = list(map_parallel(task, [(Path(p), items[p]) for p in paths], params["workers"], chunk_size=1,
                                   total=len(paths), desc=name))
        table = pd.DataFrame([s for s in scores if s], index=[Path(p).name for p, s in zip(paths, scores) if s])
        print(f"\n{name}: inner-51 NME of dlib's points, % ({len(table)} of {len(paths)} faces found)")
        if name == "annotated photos":
            print(table.round(2).to_string())
        print("mean:", table.mean().round(2).to_dict())


def _photo_task(item: tuple[Path, np.ndarray], settings: CropSettings) -> dict[str, float]:
    return photo_nmes(item[0], np.asarray(item[1], np.float64), settings)


if __name__ == "__main__":
    main()
