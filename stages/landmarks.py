"""Stage `landmarks`: 68 landmarks re-fitted on each aligned crop (data/interim/landmarks.parquet, crop px) and
the faces refused (data/interim/landmarks_rejects.parquet); metrics in reports/landmarks.json."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.detect import LandmarkSettings, run_landmarks
from stages import build_settings, read_params

CROPS = Path("data/interim/crops.parquet")
LANDMARKS = Path("data/interim/landmarks.parquet")
REJECTS = Path("data/interim/landmarks_rejects.parquet")
REPORT = Path("reports/landmarks.json")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = read_params(args.params, "landmarks", "workers")
    settings = build_settings(LandmarkSettings, params["landmarks"], "landmarks")
    report = run_landmarks(CROPS, settings, params["workers"], LANDMARKS, REJECTS)
    report.write_json(REPORT)
    print(json.dumps(report.as_dict()))


if __name__ == "__main__":
    main()
