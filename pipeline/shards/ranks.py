"""The per-image stages under torchrun: each process (rank) takes a stable share of the photos and writes its
own part of each table; rank 0 merges the parts into the table one process would have written.

A photo belongs to rank `sha1(relative path) mod world` (its faces with it), so a photo's rank depends on its
name alone, never on what else is in the folder or on the order of listing. Each rank reads its inputs in the
single-process order and writes `<table>.rank-RRRRR-of-WWWWW.parquet`; after a barrier rank 0 merges the parts
in that order (a streaming k-way merge by face_order_key: O(world) rows in memory) into `<table>.parquet` and
deletes them. Without torchrun (WORLD_SIZE unset or 1) nothing of this runs: the stage writes its tables as
before, byte for byte.
"""
from __future__ import annotations

import hashlib
import heapq
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path, PurePosixPath

import pyarrow as pa

from .accounting import StageReport
from .tables import REJECTS_SCHEMA, count_rows, iter_rows, write_table

# a rank that finishes its share waits at the barrier for the slowest one: hours on a large collection
BARRIER_TIMEOUT = timedelta(hours=48)


def photo_of(face_id: str) -> str:
    """The relative photo path of a face id ('sub/a.jpg#1' -> 'sub/a.jpg')."""
    return face_id.rsplit("#", 1)[0]


def rank_of(photo: str, world: int) -> int:
    """The rank that processes `photo` (its path relative to the input folder): the first 8 bytes of its SHA-1
    as an integer, modulo `world`."""
    digest = hashlib.sha1(photo.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % world


def face_order_key(face_id: str) -> tuple[tuple[str, ...], int]:
    """Sort key of the single-process order of the tables: photos as screen_photos sorts them (Path order of
    their relative path, part by part), then faces by index."""
    photo, _, index = face_id.rpartition("#")
    return PurePosixPath(photo).parts, int(index)


def reject_order_key(row: dict, root: Path | None) -> tuple[tuple[str, ...], int]:
    """face_order_key of a reject row: its face id, else its photo (path relative to `root`) as face -1."""
    if row["id"] is not None:
        return face_order_key(row["id"])
    path = Path(row["path"])
    return PurePosixPath(path.relative_to(root) if root is not None else path).parts, -1


@dataclass(frozen=True)
class RankShare:
    """This process's rank and the world size (0, 1 without torchrun)."""
    rank: int = 0
    world: int = 1

    @classmethod
    def from_environment(cls) -> RankShare:
        """torchrun's RANK/WORLD_SIZE; with WORLD_SIZE > 1 joins a gloo group (CPU: preprocessing needs no GPU)
        for the barrier."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
        return cls(dist.get_rank(), world)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def takes(self, photo: str) -> bool:
        """Whether this rank processes `photo` (relative path, as in the face id)."""
        return self.world == 1 or rank_of(photo, self.world) == self.rank

    def count(self, table: Path) -> int:
        """The rows of `table` (keyed by face id) whose photo this rank takes: the footer's count for one
        process, else a pass over the id column."""
        if self.world == 1:
            return count_rows(table)
        return sum(self.takes(photo_of(row["id"])) for row in iter_rows(table, columns=["id"], batch_rows=4096))

    def part(self, table: Path) -> Path:
        """Where this rank writes `table`: the table itself for one process, else its rank part."""
        if self.world == 1:
            return table
        return table.with_name(f"{table.stem}.rank-{self.rank:05d}-of-{self.world:05d}{table.suffix}")

    def parts(self, table: Path) -> list[Path]:
        """Every rank's part of `table`, in rank order."""
        return [RankShare(r, self.world).part(table) for r in range(self.world)]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def merge(self, table: Path, schema: pa.Schema, key: Callable[[dict], object]) -> int:
        """Rank 0, after every rank wrote its part: the parts merged by `key` (each part is in key order) into
        `table`, atomically, and deleted. Returns the rows written (0 on other ranks)."""
        if not self.is_main:
            return 0
        parts = self.parts(table)
        rows: Iterator[dict] = heapq.merge(*(iter_rows(p) for p in parts), key=key)
        written = write_table(rows, table, schema)
        for p in parts:
            p.unlink()
        return written

    def clear(self, table: Path) -> None:
        """Rank 0 (or the single process): delete rank parts of `table` an earlier run with any world size left,
        so no stale part is merged or mistaken for output."""
        if self.is_main:
            for p in table.parent.glob(f"{table.stem}.rank-*-of-*{table.suffix}"):
                p.unlink()

    def shutdown(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def gather_stage(share: RankShare, report: StageReport, started: float, inputs: int, table: Path,
                 schema: pa.Schema, rejects: Path, root: Path | None = None) -> StageReport | None:
    """After each rank ran a stage on its share into share.part(table) and share.part(rejects): on rank 0 both
    merged (tables in face order, rejects in photo then face order, as one process writes them) and the report of
    the whole stage (inputs: all ranks'; seconds since `started`, perf_counter); None on the other ranks. One
    process: `report` unchanged."""
    if share.world == 1:
        return report
    share.barrier()
    if not share.is_main:
        return None
    merged = StageReport(report.stage, inputs=inputs)
    merged.outputs = share.merge(table, schema, lambda row: face_order_key(row["id"]))
    share.merge(rejects, REJECTS_SCHEMA, lambda row: reject_order_key(row, root))
    merged.rejects = list(iter_rows(rejects))
    merged.seconds = time.perf_counter() - started
    return merged
