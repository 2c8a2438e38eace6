"""The `pack` stage: crops + landmarks + masks -> train/val Parquet shards, and all rejects in one table."""
from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .accounting import StageReport
from .tables import REJECTS_SCHEMA, SHARD_SCHEMA, TableWriter, count_rows, iter_rows, join_in_order, write_table

STAGE = "pack"
SPLITS = ("train", "val")


def split_of(face_id: str, val_ratio: float) -> str:
    """'val' for a stable fraction `val_ratio` of face ids, else 'train': the first 8 bytes of the id's SHA-1 as
    a uniform number in [0, 1), so a face keeps its split whatever else is in the dataset."""
    if not 0.0 <= val_ratio <= 1.0:
        raise ValueError(f"val_ratio must be in [0, 1], got {val_ratio}")
    position = int.from_bytes(hashlib.sha1(face_id.encode()).digest()[:8], "big") / 2**64
    return "val" if position < val_ratio else "train"


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of a split: '<split>-NNNNN.parquet'."""
    return f"{split}-{index:05d}.parquet"


class ShardWriter:
    """Rows of one split -> '<split>-00000.parquet', '<split>-00001.parquet', ... of `shard_rows` rows each, in row
    groups of `row_group_rows`, each file written atomically. At least one file (possibly empty, with the
    schema) is always written, so readers of an empty split need no special case."""

    def __init__(self, out_dir: Path, split: str, shard_rows: int, row_group_rows: int):
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        self.out_dir, self.split, self.shard_rows, self.row_group_rows = out_dir, split, shard_rows, row_group_rows
        self.paths: list[Path] = []
        self.rows_written = 0
        self._rows_in_shard = 0
        self._writer = self._next_shard()

    def _next_shard(self) -> TableWriter:
        path = self.out_dir / shard_name(self.split, len(self.paths))
        self.paths.append(path)
        return TableWriter(path, SHARD_SCHEMA, self.row_group_rows)

    def write_row(self, row: dict) -> None:
        """Append one row of SHARD_SCHEMA."""
        if self._rows_in_shard == self.shard_rows:
            self._writer.close()
            self._writer = self._next_shard()
            self._rows_in_shard = 0
        self._writer.write_rows([row])
        self._rows_in_shard += 1
        self.rows_written += 1

    def close(self) -> None:
        """Finish the last shard."""
        self._writer.close()

    def abort(self) -> None:
        """Drop the shard being written."""
        self._writer.abort()


def write_shards(faces: Iterable[dict], out_dir: str | Path, val_ratio: float, shard_rows: int,
                 row_group_rows: int) -> dict[str, list[Path]]:
    """Write face rows (SHARD_SCHEMA columns) into train/val shards in `out_dir`, in input order, and delete shard
    files of an earlier run that this one did not rewrite. Returns {split: shard paths}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {split: ShardWriter(out_dir, split, shard_rows, row_group_rows) for split in SPLITS}
    try:
        for row in faces:
            writers[split_of(row["id"], val_ratio)].write_row(row)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for writer in writers.values():
        writer.close()
    written = {split: writer.paths for split, writer in writers.items()}
    current = {path for paths in written.values() for path in paths}
    for split in SPLITS:
        for stale in set(out_dir.glob(f"{split}-*.parquet")) - current:
            stale.unlink()
    return written


def read_faces(paths: Iterable[str | Path]) -> pd.DataFrame:
    """All rows of the given shard files as one DataFrame with the SHARD_SCHEMA columns (id, source, face_index,
    crop JPEG bytes, landmarks 136 float32 crop px, mask PNG bytes, transform 6 float64 photo px -> crop px,
    score, detector, width, height); empty, with those columns, for no paths."""
    tables = [pq.read_table(path, schema=SHARD_SCHEMA) for path in paths]
    return (pa.concat_tables(tables) if tables else SHARD_SCHEMA.empty_table()).to_pandas()



def iter_faces(path: str | Path, batch_rows: int) -> Iterator[pd.DataFrame]:
    """The rows of one shard file as DataFrames of `batch_rows` rows (the last one shorter; read_faces' columns),
    read a row group at a time, so memory stays O(batch_rows + row group) whatever the shard's size."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=SHARD_SCHEMA.names):
        yield pa.Table.from_batches([batch]).cast(SHARD_SCHEMA).to_pandas()

DUPLICATE_FACE = "duplicate face"


def drop_duplicates(rows: Iterable[dict], rejects: list[dict]) -> Iterable[dict]:
    """The rows whose aligned crop (JPEG bytes: the same photo bytes give the same crop) no earlier row has; each
    later copy becomes a reject row ('duplicate face', naming the face kept) appended to `rejects`. The same
    photo under two names would otherwise be split by name, one copy in train and the other in val."""
    first: dict[bytes, str] = {}
    for row in rows:
        key = hashlib.sha1(row["crop"]).digest()
        if key in first:
            rejects.append({"path": row["source"], "stage": STAGE, "reason": DUPLICATE_FACE,
                            "detail": f"identical crop to {first[key]}", "id": row["id"]})
            continue
        first[key] = row["id"]
        yield row


def run_pack(crops_path: Path, landmarks_path: Path, masks_path: Path, stage_rejects: list[Path], out_dir: Path,
             rejects_out: Path, val_ratio: float, shard_rows: int, row_group_rows: int) -> StageReport:
    """The `pack` stage: join the crops, landmarks and masks tables (by id, in order) into train/val shards and
    gather the stages' rejects tables into `rejects_out`. Returns the report: inputs = faces cropped, outputs =
    faces packed, rejects = all stages' rejects, extra = faces per split and photos kept/rejected."""
    start = time.perf_counter()
    report = StageReport(STAGE, inputs=count_rows(crops_path))
    sources = set()
    duplicates: list[dict] = []

    def faces():
        joined = join_in_order(join_in_order(iter_rows(crops_path), iter_rows(landmarks_path)), iter_rows(masks_path))
        for row in drop_duplicates(joined, duplicates):
            sources.add(row["source"])
            yield row

    shards = write_shards(faces(), out_dir, val_ratio, shard_rows, row_group_rows)
    report.rejects = [row for path in stage_rejects for row in iter_rows(path)] + duplicates
    write_table(report.rejects, rejects_out, REJECTS_SCHEMA)
    report.outputs = sum(count_rows(path) for paths in shards.values() for path in paths)
    report.extra = {"faces_per_split": {split: sum(count_rows(p) for p in paths) for split, paths in shards.items()},
                    "photos_kept": len(sources),
                    "photos_rejected": len({r["path"] for r in report.rejects} - sources)}
    report.seconds = time.perf_counter() - start
    return report
