"""Stage `pack`: crops + landmarks + masks -> data/shards/{train,val}-NNNNN.parquet (stable hash split of the face
id), every preprocessing reject in reports/rejects.parquet; metrics in reports/pack.json."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pipeline.shards import run_pack
from stages import read_params

INTERIM = Path("data/interim")
SHARDS = Path("data/shards")
REJECTS = Path("reports/rejects.parquet")
REPORT = Path("reports/pack.json")
STAGE_REJECTS = [INTERIM / f"{stage}_rejects.parquet" for stage in ("crop", "landmarks", "masks")]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    p = read_params(args.params, "pack")["pack"]
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: one streaming pass, on rank 0
        return
    report = run_pack(INTERIM / "crops.parquet", INTERIM / "landmarks.parquet", INTERIM / "masks.parquet",
                      STAGE_REJECTS, SHARDS, REJECTS, p["val_ratio"], p["shard_rows"], p["row_group_rows"])
    report.write_json(REPORT)
    print(json.dumps(report.as_dict()))


if __name__ == "__main__":
    main()
