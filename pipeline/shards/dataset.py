"""Random access to the faces of Parquet shards as a torch Dataset, one row group read at a time."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from .image_bytes import decode_grey, decode_rgb
from .tables import N_LANDMARKS

# the columns an item is made of: a row group is read without the others (the 468-point mesh alone is 1404
# floats a face, which to_pydict would turn into Python objects for nothing)
ITEM_COLUMNS = ["id", "source", "face_index", "crop", "mask", "landmarks", "transform", "score", "width", "height"]


class ShardDataset(Dataset):
    """The faces of a list of shard files (SHARD_SCHEMA), indexed 0..len-1 in file, then row order.

    __init__ reads only the files' footers (row counts per row group) and keeps no file open, so the dataset
    pickles cheaply into DataLoader workers; each process opens the files it needs on first use and keeps them
    open. An item reads just its row group, and the last row group read is cached, so a sequential or
    row-group-grouped order reads each row group once.

    Item: {"image": (3, S, S) float32 RGB in [0, 1], "mask": (1, S, S) float32 in [0, 1], "lmk_px": (68, 2)
    float32 crop px, "transform": (2, 3) float64 original-photo px -> crop px, "id": str, "source": str,
    "face_index": int, "score": float, "width": int, "height": int (original photo px)}.
    """

    def __init__(self, paths: Sequence[str | Path]):
        self.paths = [str(p) for p in paths]
        groups, sizes = [], []
        for f, path in enumerate(self.paths):
            meta = pq.read_metadata(path)
            for g in range(meta.num_row_groups):
                groups.append((f, g))
                sizes.append(meta.row_group(g).num_rows)
        self._groups = groups                    # (file, row group) per global row group
        self._starts = np.cumsum([0] + sizes)    # first global row of each row group; last = len
        self._open_state()

    def _open_state(self) -> None:
        self._pid = os.getpid()
        self._files: dict[int, pq.ParquetFile] = {}
        self._cached_group: tuple[int, dict] | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_files={}, _cached_group=None)  # open files do not pickle (spawned workers)
        return state

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _row_group(self, group: int) -> dict:
        if self._pid != os.getpid():  # a forked worker must not share the parent's file handles
            self._open_state()
        if self._cached_group is None or self._cached_group[0] != group:
            f, g = self._groups[group]
            if f not in self._files:
                self._files[f] = pq.ParquetFile(self.paths[f])
            self._cached_group = (group, self._files[f].read_row_group(g, columns=ITEM_COLUMNS).to_pydict())
        return self._cached_group[1]

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} faces")
        index %= len(self)
        # side="right" skips empty row groups, which share their start with the next one
        group = int(np.searchsorted(self._starts, index, side="right")) - 1
        columns = self._row_group(group)
        row = index - int(self._starts[group])
        image = decode_rgb(columns["crop"][row])
        mask = decode_grey(columns["mask"][row])
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0),
            "mask": torch.from_numpy(mask)[None].float().div_(255.0),
            "lmk_px": torch.tensor(columns["landmarks"][row], dtype=torch.float32).view(N_LANDMARKS, 2),
            "transform": torch.tensor(columns["transform"][row], dtype=torch.float64).view(2, 3),
            "id": columns["id"][row], "source": columns["source"][row], "face_index": columns["face_index"][row],
            "score": columns["score"][row], "width": columns["width"][row], "height": columns["height"][row],
        }
