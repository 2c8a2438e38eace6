"""Preprocessing tables and training shards: Parquet schemas and atomic writers, the reject accounting, the
ordered parallel map of the per-image stages, the `pack` stage and the torch Dataset over the shards.

ShardDataset is imported on first use: it needs torch, whose import alone costs the CPU-only preprocessing
stages about a second per process.
"""
from .accounting import Rejected, StageReport, reject_row, screen_photos
from .image_bytes import decode_grey, decode_rgb, encode_jpeg, encode_png
from .pack import iter_faces, read_faces, run_pack, split_of, write_shards
from .parallel import map_parallel, resolve_workers
from .tables import (CROPS_SCHEMA, LANDMARKS_SCHEMA, MASKS_SCHEMA, REJECTS_SCHEMA, SHARD_SCHEMA, TableWriter,
                     iter_rows, join_in_order, write_table)

__all__ = ["CROPS_SCHEMA", "LANDMARKS_SCHEMA", "MASKS_SCHEMA", "REJECTS_SCHEMA", "SHARD_SCHEMA", "Rejected",
           "ShardDataset", "StageReport", "TableWriter", "decode_grey", "decode_rgb", "encode_jpeg", "encode_png",
           "iter_faces", "iter_rows", "join_in_order", "map_parallel", "read_faces", "reject_row", "resolve_workers",
           "run_pack", "screen_photos", "split_of", "write_shards", "write_table"]


def __getattr__(name: str):
    if name == "ShardDataset":
        from .dataset import ShardDataset
        return ShardDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
