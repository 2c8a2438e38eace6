"""Stage `masks`: a soft face-region mask per aligned crop (data/interim/masks.parquet, 224 x 224 PNG, 0..255) by
masks.method: the face mesh gated by skin colour (mesh; a face without a usable mesh falls back to skin, recorded
in the `method` and `fallback` columns), the landmark-guided skin colour model (skin) or BiSeNet face parsing
with masks.bisenet_weights (bisenet); faces refused in data/interim/masks_rejects.parquet; counts in
reports/masks.json.

    python -m stages.masks
    torchrun --nproc-per-node N -m stages.masks    # each rank the faces of its share of the photos; rank 0 merges
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipeline.host_memory import keep_freed_memory
from pipeline.segment import MaskSettings, run_masks
from pipeline.shards import MASKS_SCHEMA
from pipeline.shards.ranks import RankShare, gather_stage
from pipeline.shards.tables import count_rows
from stages import build_settings, read_params

CROPS = Path("data/interim/crops.parquet")
LANDMARKS = Path("data/interim/landmarks.parquet")
MASKS = Path("data/interim/masks.parquet")
REJECTS = Path("data/interim/masks_rejects.parquet")
REPORT = Path("reports/masks.json")


def parsing_device(settings: MaskSettings) -> str:
    """Where BiSeNet runs: the GPU when there is one (torch is only imported when BiSeNet is used)."""
    if settings.method != "bisenet":
        return "cpu"
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    keep_freed_memory()
    params = read_params(args.params, "masks", "workers")
    settings = build_settings(MaskSettings, params["masks"], "masks")
    started = time.perf_counter()
    share = RankShare.from_environment()
    for table in (MASKS, REJECTS):
        share.clear(table)
    share.barrier()
    report = run_masks(CROPS, LANDMARKS, settings, params["workers"], parsing_device(settings), share.part(MASKS),
                       share.part(REJECTS), share)
    report = gather_stage(share, report, started, count_rows(LANDMARKS), MASKS, MASKS_SCHEMA, REJECTS)
    share.shutdown()
    if report is None:  # another rank: rank 0 merged its tables and writes the report
        return
    report.write_json(REPORT)
    print(json.dumps(report.as_dict()))


if __name__ == "__main__":
    main()
