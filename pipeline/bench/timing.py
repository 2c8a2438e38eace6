"""The one timing rule of the benchmarks: median wall seconds of repeated calls after warm-up calls."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(step: Callable[[], None], repeats: int, warmup: int) -> float:
    """Median seconds of `repeats` timed calls of `step` after `warmup` untimed ones (allocator, thread pools,
    lazy initialisation). CUDA callers synchronise inside `step`."""
    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)
