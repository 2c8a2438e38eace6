"""Ordered parallel map over the items of a stage (photos, crops), in chunks, over worker processes.

Workers load their models themselves, lazily, through per-process caches (functools.cache loaders in the
task modules), so nothing large is pickled and the same task functions run in-process for a single photo.

Workers come from a fork server, never from a fork of the calling process: native thread pools that process may
hold (dlib's CNN detector, OpenMP, CUDA) do not survive a fork, and a forked worker that uses them waits
forever (seen with dlib's CNN detector run in the parent before a fork). The server imports the preprocessing
modules once, so each worker starts without re-importing them.
"""
from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import TypeVar

import cv2
from threadpoolctl import threadpool_limits
from tqdm import tqdm

Item = TypeVar("Item")
Result = TypeVar("Result")
_SERVER_PRELOAD = ["pipeline.detect", "pipeline.segment"]  # what the stage tasks import


def resolve_workers(workers: int) -> int:
    """The `workers` param as a process count: 0 = all cores (os.cpu_count())."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = all cores), got {workers}")
    return workers or os.cpu_count() or 1


def worker_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context of the stage workers: the fork server, started with the first pool (or by
    start_worker_server) with the preprocessing modules imported."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_SERVER_PRELOAD)
    return context


def start_worker_server() -> None:
    """Start the workers' fork server now rather than with the first pool, and wait until it has imported the
    preprocessing modules (keeps that one-off cost out of timings)."""
    with worker_context().Pool(1) as pool:
        pool.apply(int)


def _one_thread_per_worker() -> None:
    # N workers each running a multi-threaded OpenCV / BLAS would oversubscribe the N cores
    cv2.setNumThreads(1)
    threadpool_limits(1)


def _apply_to_chunk(fn: Callable[[Item], Result], chunk: list[Item]) -> list[Result]:
    return [fn(item) for item in chunk]


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def map_parallel(fn: Callable[[Item], Result], items: Iterable[Item], workers: int, chunk_size: int,
                 total: int | None = None, desc: str = "") -> Iterator[Result]:
    """Yield fn(item) for every item, in input order.

    fn: a picklable (module-level or functools.partial) function of one item. workers: processes, 0 = all
    cores; never more than the number of chunks, and with one process everything runs here, in-process, so a
    handful of items does not pay for starting processes and loading models in them. chunk_size: items per task
    sent to a worker (larger for cheap items). total: the number of items if known (progress bar and process
    count). At most 2 chunks per worker are in flight, so a streamed input is never read far ahead.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    processes = resolve_workers(workers)
    if total is not None:
        processes = max(1, min(processes, -(-total // chunk_size)))
    with tqdm(total=total, desc=desc, unit="item", mininterval=1.0) as bar:
        if processes == 1:
            for item in items:
                yield fn(item)
                bar.update()
            return
        with worker_context().Pool(processes, initializer=_one_thread_per_worker) as pool:
            pending: deque = deque()
            for chunk in _chunks(items, chunk_size):
                pending.append(pool.apply_async(_apply_to_chunk, (fn, chunk)))
                if len(pending) >= 2 * processes:
                    results = pending.popleft().get()
                    yield from results
                    bar.update(len(results))
            while pending:
                results = pending.popleft().get()
                yield from results
                bar.update(len(results))
