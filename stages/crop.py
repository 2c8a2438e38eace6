"""Stage `crop`: the photos of data.images -> aligned 224 x 224 face crops (data/interim/crops.parquet) and the
photos refused (data/interim/crop_rejects.parquet); metrics in reports/crop.json."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.detect import CropSettings, run_crop
from pipeline.detect.photo_io import PHOTO_EXTENSIONS
from pipeline.shards import REJECTS_SCHEMA, screen_photos, write_table
from stages import build_settings, read_params

CROPS = Path("data/interim/crops.parquet")
REJECTS = Path("data/interim/crop_rejects.parquet")
REPORT = Path("reports/crop.json")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = read_params(args.params, "data", "crop", "workers")
    images = Path(params["data"]["images"])
    settings = build_settings(CropSettings, params["crop"], "crop")
    if not images.is_dir():
        raise SystemExit(f"data.images: photo folder not found: {images}")
    photos, screened = screen_photos(images, PHOTO_EXTENSIONS)
    report = run_crop(photos, images, settings, params["workers"], CROPS, REJECTS)
    if screened:  # folders named like photos, dangling symlinks, unreadable files: rejects too, never skipped
        report.inputs += len(screened)
        report.rejects = sorted(report.rejects + screened, key=lambda r: r["path"])
        write_table(report.rejects, REJECTS, REJECTS_SCHEMA)
    report.write_json(REPORT)
    print(json.dumps(report.as_dict()))


if __name__ == "__main__":
    main()
