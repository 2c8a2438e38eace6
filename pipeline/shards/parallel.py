"""Ordered parallel map over the items of a stage (photos, crops), in chunks, over worker processes.

Workers load their models themselves, lazily, through per-process caches (functools.cache loaders in the
task modules), so nothing large is pickled and the same task functions run in-process for a single photo.

Workers come from a fork server, never from a fork of the calling process: native thread pools that process may
hold (dlib's CNN detector, OpenMP, CUDA) do not survive a fork, and a forked worker that uses them waits
forever (seen with dlib's CNN detector run in the parent before a fork). The server imports the preprocessing
modules once, so each worker starts without re-importing them. Workers also leave out the caller's __main__
(unless the task comes from it): multiprocessing would otherwise re-run its imports in every worker of every pool,
which for a caller that imports torch (the bench, a notebook) costs seconds per pool, more than the whole work of a
stage on a few dozen photos.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import pickle
import sys
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
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


@contextmanager
def _callers_main_hidden(hide: bool) -> Iterator[None]:
    """While `hide`, __main__ is a blank module: workers started meanwhile get no main script in their
    preparation data, so they do not re-run the caller's imports."""
    main = sys.modules["__main__"]
    if hide:
        sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _refers_to_main(*objects) -> bool:
    """Whether unpickling `objects` needs the caller's __main__ (a function or class defined in the script)."""
    return b"__main__" in pickle.dumps(objects)


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
        chunks = _chunks(items, chunk_size)
        first = next(chunks, None)
        if first is None:
            return
        with _callers_main_hidden(not _refers_to_main(fn, first)):  # Pool() starts all its workers
            pool = worker_context().Pool(processes, initializer=_one_thread_per_worker)
        with pool:
            pending: deque = deque()
            for chunk in itertools.chain([first], chunks):
                pending.append(pool.apply_async(_apply_to_chunk, (fn, chunk)))
                if len(pending) >= 2 * processes:
                    results = pending.popleft().get()
                    yield from results
                    bar.update(len(results))
            while pending:
                results = pending.popleft().get()
                yield from results
                bar.update(len(results))
