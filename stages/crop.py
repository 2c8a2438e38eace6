"""Stage `crop`: the photos of data.images -> aligned 224 x 224 face crops (data/interim/crops.parquet) and the
photos refused (data/interim/crop_rejects.parquet); metrics in reports/crop.json."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from pipeline.detect import CropSettings, list_photos, run_crop

CROPS = Path("data/interim/crops.parquet")
REJECTS = Path("data/interim/crop_rejects.parquet")
REPORT = Path("reports/crop.json")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = yaml.safe_load(Path(args.params).read_text())
    images = Path(params["data"]["images"])
    report = run_crop(list_photos(images), images, CropSettings(**params["crop"]), params["workers"], CROPS, REJECTS)
    report.write_json(REPORT)
    print(json.dumps(report.as_dict()))


if __name__ == "__main__":
    main()
