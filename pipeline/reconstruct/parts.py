"""The reconstruction table on disk: one Parquet part per input shard, written atomically, resumable, and the one
reader every consumer uses.

    <out>/coefficients/part-<name>.parquet   one row per face (pipeline.reconstruct.outputs.face_rows' columns,
                                             without verts_model unless reconstruct.write_vertices)

A part records in its Parquet metadata what it was made from (`key`: the input shard's name, size and footer
digest and the digest of the run's parameters and model files) and the faces of its input it rejected, so an
interrupted run keeps every finished part and a later run redoes only the parts that are missing or stale.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..face_model import FaceDecoder
from ..shards.tables import remove_stale_temporaries

PART_DIR = "coefficients"
PART_PREFIX = "part-"
METADATA_KEY = b"reconstruct_part"
COEFF_COLUMN_PREFIX = "coeff_"  # coefficient group columns: coeff_id, coeff_exp, ... (`id` is the face id)
FOOTER_BYTES = 1 << 16  # a Parquet file's tail: its footer (row groups, offsets, statistics) and end magic


def part_path(out: str | Path, name: str) -> Path:
    """<out>/coefficients/part-<name>.parquet"""
    return Path(out) / PART_DIR / f"{PART_PREFIX}{name}.parquet"


def part_paths(out: str | Path) -> list[Path]:
    """The finished parts under `out`, sorted by name (temporaries of unfinished writes are not parts)."""
    folder = Path(out) / PART_DIR
    return sorted(folder.glob(f"{PART_PREFIX}*.parquet")) if folder.is_dir() else []


def digest_files(paths: Iterable[str | Path]) -> str:
    """SHA-1 hex of the contents of `paths` (model files a run decodes with), in the order given."""
    h = hashlib.sha1()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def shard_key(shard: str | Path, run_digest: str) -> str:
    """What a part made from `shard` by a run with `run_digest` records: the shard's name, byte size and a digest
    of its last FOOTER_BYTES (the Parquet footer, which changes with any row group), and the run digest. O(1) in
    the shard's size."""
    shard = Path(shard)
    size = shard.stat().st_size
    with open(shard, "rb") as f:
        f.seek(max(0, size - FOOTER_BYTES))
        tail = hashlib.sha1(f.read()).hexdigest()
    return json.dumps({"shard": shard.name, "bytes": size, "footer_sha1": tail, "run": run_digest}, sort_keys=True)


def part_metadata(path: Path) -> dict | None:
    """{"key": ..., "inputs": faces read, "rejects": [reject rows]} of a part, or None if it is not a readable
    part (a file from before parts existed, a truncated file)."""
    try:
        meta = pq.read_metadata(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None


def is_current(path: Path, key: str) -> bool:
    """Whether `path` is a finished part made with `key`."""
    meta = part_metadata(path) if path.is_file() else None
    return meta is not None and meta["key"] == key


class PartWriter:
    """Rows of one part -> `path`, a row group per write, atomically: rows go to `<path>.tmp-<pid>`, which
    replaces `path` on close() with `key`, the number of inputs and the rejects in its metadata. The schema is the
    first written batch's; a part of no rows has an empty schema (read_reconstructions skips it)."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.rows_written = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        self._tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        self._writer: pq.ParquetWriter | None = None

    def write(self, rows: list[dict]) -> None:
        """Append rows (dicts of one schema: python scalars and numpy arrays)."""
        if not rows:
            return
        if self._writer is None:
            table = pa.Table.from_pylist(rows)
            self._writer = pq.ParquetWriter(self._tmp, table.schema)
        else:
            table = pa.Table.from_pylist(rows, schema=self._writer.schema)
        self._writer.write_table(table, row_group_size=len(rows))
        self.rows_written += len(rows)

    def close(self, inputs: int, rejects: Sequence[dict]) -> None:
        """Record the metadata and move the part into place. inputs: faces read; rejects: REJECTS_SCHEMA rows of
        the faces of the input this part does not hold."""
        meta = {METADATA_KEY: json.dumps({"key": self.key, "inputs": inputs, "rejects": list(rejects)})}
        if self._writer is None:  # no rows: the metadata alone
            pq.write_table(pa.table({}).replace_schema_metadata(meta), self._tmp)
        else:
            self._writer.add_key_value_metadata(meta)
            self._writer.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the temporary file."""
        if self._writer is not None:
            self._writer.close()
        self._tmp.unlink(missing_ok=True)


def read_reconstructions(out: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The reconstruction table of an output folder: every part of `out`/coefficients in name order, as one
    DataFrame (face_rows' columns, or `columns`); empty with no parts or no rows. Raises FileNotFoundError when
    `out` holds no coefficients folder (nothing was reconstructed there)."""
    folder = Path(out) / PART_DIR
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no reconstruction parts (run stages.reconstruct)")
    tables = []
    for path in part_paths(out):
        if pq.read_metadata(path).num_rows:
            tables.append(pq.read_table(path, columns=list(columns) if columns is not None else None))
    if not tables:
        return pd.DataFrame(columns=list(columns) if columns is not None else None)
    return pa.concat_tables(tables).to_pandas()


def coefficient_vectors(table: pd.DataFrame, layout) -> np.ndarray:
    """The coefficient group columns (coeff_id, coeff_exp, ...) of a reconstruction table -> (N, layout.size)
    float32 in the layout's order. Raises ValueError when a group's size differs from the layout's (rows of
    another face model)."""
    groups = []
    for name, k in layout.sizes.items():
        column = table[COEFF_COLUMN_PREFIX + name]
        values = np.stack([np.asarray(v, np.float32).reshape(-1) for v in column]) if len(table) else \
            np.zeros((0, k), np.float32)
        if values.shape[1] != k:
            raise ValueError(f"coefficient group {name!r} has {values.shape[1]} values per face, the face model "
                             f"expects {k} (reconstructed with a different face model?)")
        groups.append(values)
    return np.concatenate(groups, axis=1)


def meshes_from_coefficients(decoder: FaceDecoder, table: pd.DataFrame, batch_size: int = 256) -> np.ndarray:
    """The identity + expression meshes of a reconstruction table's faces, decoded from their coefficients:
    (N, V, 3) float32, model space, mm (the `verts_model` reconstruct writes with reconstruct.write_vertices)."""
    coeffs = torch.from_numpy(coefficient_vectors(table, decoder.layout))
    device = decoder.triangles.device
    out = np.zeros((len(table), decoder.mean_shape.shape[0], 3), np.float32)
    with torch.no_grad():
        for lo in range(0, len(table), batch_size):
            out[lo:lo + batch_size] = decoder(coeffs[lo:lo + batch_size].to(device)).verts_model.cpu().numpy()
    return out

