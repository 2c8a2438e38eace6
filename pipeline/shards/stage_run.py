"""The common shape of the per-image stages: a task per item over worker processes, its rows streamed into one
Parquet table, its reject rows into another, and the counts into a StageReport."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow as pa

from .accounting import StageReport
from .parallel import map_parallel
from .tables import REJECTS_SCHEMA, write_table

Task = Callable[[object], tuple[list[dict], list[dict]]]


def run_stage(stage: str, task: Task, items: Iterable, n_items: int, workers: int, chunk_size: int,
              out_path: Path, out_schema: pa.Schema, rejects_path: Path) -> StageReport:
    """Run `task` (item -> (output rows, reject rows); picklable) over `items` in input order with map_parallel,
    write its output rows to `out_path` (out_schema) and its rejects to `rejects_path` (REJECTS_SCHEMA), both
    atomically and both even when empty. Returns the report: inputs = n_items, outputs = rows written."""
    report, start = StageReport(stage, inputs=n_items), time.perf_counter()

    def output_rows():
        for rows, rejects in map_parallel(task, items, workers, chunk_size, total=n_items, desc=stage):
            report.rejects += rejects
            yield from rows

    report.outputs = write_table(output_rows(), out_path, out_schema)
    write_table(report.rejects, rejects_path, REJECTS_SCHEMA)
    report.seconds = time.perf_counter() - start
    return report
