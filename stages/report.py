"""Stage `report`: reports/index.html, one self-contained page with the metrics tables and a contact sheet of
the reconstructed faces (input crop, overlay on the photo, mesh shading, landmarks)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from pipeline.face_model import FaceDecoder, load_face_model
from pipeline.reconstruct.report import face_cards, read_metrics, report_html
from pipeline.reconstruct.parts import read_reconstructions
from pipeline.shards import decode_rgb
from stages import read_params

RECONSTRUCT_SUMMARY = Path("reports/reconstruct.json")  # the reconstruct stage's summary (dvc.yaml)
TRAIN_CURVES = Path("reports/train_curves.png")  # the train stage's curves (dvc.yaml), embedded when present


def input_crops(shards_dir: Path, ids: set[str]) -> dict:
    """{face id: aligned input crop (S, S, 3) uint8 RGB} for the ids found in the Parquet shards, read a row
    group at a time (only the crops shown are kept)."""
    crops = {}
    for shard in sorted(shards_dir.glob("*.parquet")):
        for batch in pq.ParquetFile(shard).iter_batches(columns=["id", "crop"]):
            for face_id, crop in zip(batch.column("id").to_pylist(), batch.column("crop").to_pylist()):
                if face_id in ids:
                    crops[face_id] = decode_rgb(crop)
    return crops


def summary_line(table: pd.DataFrame, shown: int, model_name: str) -> str:
    """e.g. '27 faces from 25 photos · methods: fit · face model: sfm (showing 20 of 27)'."""
    text = (f"{len(table)} faces from {table['source'].nunique()} photos \u00b7 "
            f"methods: {', '.join(sorted(table['method'].unique()))} \u00b7 face model: {model_name}")
    return text if shown == len(table) else f"{text} (showing the first {shown})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="reports/index.html")
    args = ap.parse_args()
    params = read_params(args.params, "report", "reconstruct.out", "reconstruct.shards",
                         "reconstruct.face_model")
    p, rec = params["report"], params["reconstruct"]  # the report shows what the reconstruct stage wrote

    reconstructions = Path(rec["out"])
    table = read_reconstructions(reconstructions)
    shown = table.head(p["max_faces"])
    # the model the coefficients belong to: the one reconstruct decoded with (the trained copy next to the
    # checkpoint when training changed the face model), else the configured one
    summary = RECONSTRUCT_SUMMARY.exists() and json.loads(RECONSTRUCT_SUMMARY.read_text()) or {}
    model = load_face_model(summary.get("face_model", rec["face_model"]))
    crops = input_crops(Path(rec["shards"]), set(shown["id"]))
    cards = face_cards(shown, FaceDecoder(model), reconstructions / "faces", crops)
    metrics = read_metrics({title: Path(path) for title, path in p["metrics"].items()})
    figures = {"R-Net training: loss, loss terms, validation landmark error, learning rate":
               TRAIN_CURVES.read_bytes()} if TRAIN_CURVES.is_file() else {}
    page = report_html(p["title"], summary_line(table, len(shown), model.name), metrics, cards,
                       p["thumb_px"], p["jpeg_quality"], figures)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    missing = sum(img is None for card in cards for img in card.images)
    print(f"{len(cards)} faces, {len(metrics)} metrics tables, {missing} images not available, "
          f"{out.stat().st_size / 1e6:.2f} MB -> {out}")


if __name__ == "__main__":
    main()
