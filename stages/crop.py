"""Stage `crop`: the photos of data.images -> aligned 224 x 224 face crops (data/interim/crops.parquet) and the
photos refused (data/interim/crop_rejects.parquet); metrics in reports/crop.json.

    python -m stages.crop
    torchrun --nproc-per-node N -m stages.crop    # each rank a stable share of the photos; rank 0 merges
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipeline.detect import CropSettings, run_crop
from pipeline.detect.crop import photo_key
from pipeline.detect.photo_io import PHOTO_EXTENSIONS
from pipeline.shards import CROPS_SCHEMA, REJECTS_SCHEMA, screen_photos, write_table
from pipeline.shards.ranks import RankShare, gather_stage
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
    started = time.perf_counter()
    share = RankShare.from_environment()
    for table in (CROPS, REJECTS):
        share.clear(table)
    share.barrier()
    photos, screened = screen_photos(images, PHOTO_EXTENSIONS)
    mine = [p for p in photos if share.takes(photo_key(p, images))]
    report = run_crop(mine, images, settings, params["workers"], share.part(CROPS), share.part(REJECTS))
    report = gather_stage(share, report, started, len(photos), CROPS, CROPS_SCHEMA, REJECTS, images)
    share.shutdown()
    if report is None:  # another rank: rank 0 merged its tables and writes the report
        return
    if screened:  # folders named like photos, dangling symlinks, unreadable files: rejects too, never skipped
        report.inputs += len(screened)
        report.rejects = sorted(report.rejects + screened, key=lambda r: r["path"])
        write_table(report.rejects, REJECTS, REJECTS_SCHEMA)
    report.write_json(REPORT)
    print(json.dumps(report.as_dict()))


if __name__ == "__main__":
    main()
