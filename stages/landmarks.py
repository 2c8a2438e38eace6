"""Stage `landmarks`: 68 landmarks re-fitted on each aligned crop (data/interim/landmarks.parquet, crop px) and
the faces refused (data/interim/landmarks_rejects.parquet); metrics in reports/landmarks.json.

    python -m stages.landmarks
    torchrun --nproc-per-node N -m stages.landmarks    # each rank the faces of its share of the photos; rank 0 merges
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipeline.detect import LandmarkSettings, run_landmarks
from pipeline.shards import LANDMARKS_SCHEMA
from pipeline.shards.ranks import RankShare, gather_stage
from pipeline.shards.tables import count_rows
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
    started = time.perf_counter()
    share = RankShare.from_environment()
    for table in (LANDMARKS, REJECTS):
        share.clear(table)
    share.barrier()
    report = run_landmarks(CROPS, settings, params["workers"], share.part(LANDMARKS), share.part(REJECTS), share)
    report = gather_stage(share, report, started, count_rows(CROPS), LANDMARKS, LANDMARKS_SCHEMA, REJECTS)
    share.shutdown()
    if report is None:  # another rank: rank 0 merged its tables and writes the report
        return
    report.write_json(REPORT)
    print(json.dumps(report.as_dict()))


if __name__ == "__main__":
    main()
